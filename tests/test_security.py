"""Security: what the worker logs, and how SQL is built.

* A worker logging at INFO (every logger, not only ours) never writes a task's params or result.
* Values reach SQL only as bound parameters. The only text spliced into statements is a table name,
  and a queue name given by a caller (settings, a spawn, a command line option) is checked by
  ``conf.queue_name_error`` before any SQL runs; a queue name read back from the catalog (a queue
  another tool created) is quoted as an identifier.

The admin's permission matrix (who may see params, retry, cancel, emit) is tested in test_admin.py.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.management import CommandError, call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from django_absurd_agents import absurd, conf
from django_absurd_agents.client import ProjectAbsurd

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "django_absurd_agents"

EVIL_QUEUES = [
    "x; drop table absurd.queues",
    'agents"; drop table absurd.t_agents; --',
    "agents' or '1'='1",
    "Agents",
    "a-b",
    "we%sird",
    "q" * 58,
    "",
]


# --- logs ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_logs_at_info_hold_no_params_or_results(
    worker_env: dict[str, str], clean_queues: None, tmp_path: Path
) -> None:
    secret = f"sk-secret-{uuid.uuid4().hex}"
    (tmp_path / "info_logging_settings.py").write_text(
        "from tests.settings_chaos import *  # noqa: F403\n"
        "LOGGING = {\n"
        "    'version': 1,\n"
        "    'disable_existing_loggers': False,\n"
        "    'handlers': {'console': {'class': 'logging.StreamHandler'}},\n"
        "    'root': {'handlers': ['console'], 'level': 'INFO'},\n"
        "}\n"
    )
    completes = absurd.spawn_sync("load_agent", {"n": secret, "api_key": secret})["task_id"]
    unknown = absurd.spawn_sync("not_registered_anywhere", {"password": secret}, max_attempts=1)["task_id"]
    env = {
        **worker_env,
        "DJANGO_SETTINGS_MODULE": "info_logging_settings",
        "PYTHONPATH": f"{tmp_path}:{ROOT}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "django", "absurd_worker", "--burst", "--queue", "agents", "--poll-interval", "0.05"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    # The secret went through the worker: into the agent's prompt, the task's result...
    done = result_of(completes)
    assert done.state == "completed" and done.result["n"] == secret
    # A task no worker knows is failed or put back for a later deploy, depending on the grace
    # settings; either way it never runs here, and the log names it.
    assert result_of(unknown).state in ("failed", "sleeping", "pending")
    # ...and the log says what happened to both tasks, by name and id only.
    assert f"task completed name=load_agent id={completes}" in output, output
    assert f"name=not_registered_anywhere id={unknown}" in output, output
    assert secret not in output
    assert "sk-secret" not in output


def result_of(task_id: Any) -> Any:
    """The task's result snapshot (typed loosely: tests index into its JSON)."""
    snapshot = absurd.fetch_task_result_sync(task_id)
    assert snapshot is not None, f"task {task_id} not found"
    return snapshot


# --- queue names before SQL -------------------------------------------------------------------------


@pytest.mark.parametrize("name", EVIL_QUEUES)
def test_conf_refuses_queue_names_that_are_not_plain_identifiers(name: str) -> None:
    assert conf.queue_name_error(name) is not None


@pytest.mark.parametrize("name", ["agents", "other", "billing_2", "_private"])
def test_conf_accepts_plain_queue_names(name: str) -> None:
    assert conf.queue_name_error(name) is None


def test_system_check_refuses_a_queue_name_in_settings(settings: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "QUEUES": ["agents", "x; drop table absurd.queues"]}
    with pytest.raises(SystemCheckError, match=r"absurd_agents\.E003"):
        call_command("check", tags=["compatibility"])


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", EVIL_QUEUES[:3])
def test_spawning_to_an_evil_queue_is_refused_before_any_sql(name: str) -> None:
    with CaptureQueriesContext(connection) as queries, pytest.raises(ValueError, match="Queue name"):
        absurd.spawn_sync("anything", {}, queue=name)
    assert len(queries) == 0

    client = ProjectAbsurd()

    async def spawn() -> None:
        await client.spawn("anything", {}, queue=name)

    with pytest.raises(ValueError, match="Queue name"):
        async_to_sync(spawn)()
    assert not client._conns  # refused before a connection was even opened


SYNC_CALLS = {
    "fetch_task_result_sync": lambda q: absurd.fetch_task_result_sync(uuid.uuid4(), queue_name=q),
    "cancel_task_sync": lambda q: absurd.cancel_task_sync(uuid.uuid4(), queue_name=q),
    "retry_task_sync": lambda q: absurd.retry_task_sync(uuid.uuid4(), queue_name=q),
    "emit_event_sync": lambda q: absurd.emit_event_sync("approval:1", {}, queue_name=q),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("method", list(SYNC_CALLS))
def test_client_calls_with_an_evil_queue_name_are_refused_before_any_sql(method: str) -> None:
    evil = 'agents"; drop table absurd.t_agents; --'
    with CaptureQueriesContext(connection) as queries, pytest.raises(ValueError, match="Queue name"):
        SYNC_CALLS[method](evil)
    assert len(queries) == 0
    with connection.cursor() as cursor:
        cursor.execute("select to_regclass('absurd.t_agents') is not null")
        assert cursor.fetchone()[0]


ASYNC_CALLS = {
    "fetch_task_result": lambda c, q: c.fetch_task_result(uuid.uuid4(), queue_name=q),
    "cancel_task": lambda c, q: c.cancel_task(uuid.uuid4(), queue_name=q),
    "retry_task": lambda c, q: c.retry_task(uuid.uuid4(), queue_name=q),
    "emit_event": lambda c, q: c.emit_event("approval:1", {}, queue_name=q),
    "await_task_result": lambda c, q: c.await_task_result(uuid.uuid4(), timeout=0.1, queue_name=q),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("method", list(ASYNC_CALLS))
def test_async_client_calls_with_an_evil_queue_name_are_refused_before_connecting(method: str) -> None:
    client = ProjectAbsurd()

    async def call() -> None:
        await ASYNC_CALLS[method](client, "x; drop table absurd.queues")

    with pytest.raises(ValueError, match="Queue name"):
        async_to_sync(call)()
    assert not client._conns


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("absurd_tasks", []),
        ("absurd_cleanup", []),
        ("absurd_task", [str(uuid.uuid4())]),
        ("absurd_cancel", [str(uuid.uuid4())]),
        ("absurd_retry", [str(uuid.uuid4())]),
        ("absurd_emit", ["approval:1"]),
        ("absurd_worker", []),
    ],
)
def test_commands_refuse_an_evil_queue_before_any_sql(command: str, args: list[str]) -> None:
    with (
        CaptureQueriesContext(connection) as queries,
        pytest.raises(CommandError, match="may contain only lowercase letters"),
    ):
        call_command(command, *args, "--queue", "x; drop table absurd.queues")
    assert len(queries) == 0


@pytest.mark.django_db(transaction=True)
def test_a_catalogued_queue_with_an_odd_name_is_quoted_not_spliced(clean_queues: None) -> None:
    """Absurd itself accepts any queue name up to 57 bytes, so a queue created by another tool may
    hold quotes or ``%``; the commands that walk the catalog must quote it as an identifier and keep
    it away from parameter placeholders."""
    odd = 'we%sird"q'
    with connection.cursor() as cursor:
        cursor.execute("select absurd.create_queue(%s)", [odd])
    try:
        spawned = absurd.spawn_sync("odd_task", {"x": 1}, queue="agents")
        with connection.cursor() as cursor:
            cursor.execute("select task_id from absurd.spawn_task(%s, 'odd_task', '{}'::jsonb, '{}'::jsonb)", [odd])
            odd_task = str(cursor.fetchone()[0])
        call_command("absurd_tasks", "--json", stdout=(out := io.StringIO()))
        assert spawned["task_id"] in out.getvalue() and odd_task in out.getvalue()
        call_command("absurd_task", odd_task, "--json", stdout=(one := io.StringIO()))
        assert odd_task in one.getvalue()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("select absurd.drop_queue(%s)", [odd])


# --- bound parameters only --------------------------------------------------------------------------

_SQL_START = re.compile(r"^\s*\(?\s*(select|insert|update|delete|truncate|with)\b", re.IGNORECASE)

REVIEWED_SPLICES = {
    # A table name built by table(): a fixed prefix and a queue name, quoted as an identifier.
    "table('t', queue)",
    "table('r', queue)",
    "table('c', queue)",
    "table('w', queue)",
    "table('e', queue)",
    "table('t', q)",
    "table('r', q)",
    "table('t', name)",
    "_ops.table('e', queue)",
    "table('i', queue)",
    "table('c', q)",
    # metrics.py: fixed SQL expressions (a case over checkpoint names; a token sum whose alias and
    # direction are literals at every call).
    "_KIND",
    "_tokens('s', 'input')",
    "_tokens('s', 'output')",
    "_tokens('c', 'input')",
    "_tokens('c', 'output')",
    # partitions.py: a week's partition of a queue's table, named by table() from the catalog's relname.
    "week.partition('t')",
    "week.partition('r')",
    # absurd_task.py / absurd_tasks.py: local names for the same table() results.
    "t",
    "r",
    "c",
    "w",
    "e",
    # task_list.py: clauses made of fixed SQL with %s placeholders, joined; "asc" or "desc"; a fixed
    # column list; union branches built the same way; a list branch's clauses, fixed SQL made of those.
    "where",
    "direction",
    "_LIST_COLUMNS",
    "clauses",
    "' union all '.join(branches)",
}


def sql_splices() -> dict[str, list[str]]:
    """Every expression interpolated into an f-string that is an SQL statement, by ``file:line``."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(str(part.value) for part in node.values if isinstance(part, ast.Constant))
                if _SQL_START.match(text):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found[where] = [
                        ast.unparse(part.value) for part in node.values if isinstance(part, ast.FormattedValue)
                    ]
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
                if isinstance(node.left, ast.Constant) and _SQL_START.match(str(node.left.value)):
                    found[f"{path.relative_to(ROOT)}:{node.lineno}"] = ["%-formatting"]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
                target = node.func.value
                if isinstance(target, ast.Constant) and _SQL_START.match(str(target.value)):
                    found[f"{path.relative_to(ROOT)}:{node.lineno}"] = [".format()"]
    return found


def test_sql_statements_splice_only_reviewed_identifiers() -> None:
    """Values go in as %s parameters. A new splice fails this test until someone has checked it is an
    identifier built by table() (or fixed SQL text) and added it to REVIEWED_SPLICES."""
    splices = sql_splices()
    assert splices, "the scan found no SQL at all: the pattern is broken"
    unreviewed = {where: [e for e in exprs if e not in REVIEWED_SPLICES] for where, exprs in splices.items()}
    assert not {where: exprs for where, exprs in unreviewed.items() if exprs}


@pytest.mark.django_db
def test_table_names_quote_whatever_the_catalog_holds() -> None:
    from django_absurd_agents import tables

    odd = 'we%sird"; drop table absurd.queues; --'
    makers: list[Any] = [tables.table]
    for table in makers:
        name = table("t", odd)
        assert name.endswith('"')
        assert name.count('"') % 2 == 0
        assert '""' in name  # the quote inside is doubled, not closing the identifier
        assert "%s" not in name.replace("%%", "")  # and never a placeholder


def test_the_worker_log_fields_hold_no_params() -> None:
    """The worker's structured log fields carry ids, names and outcomes only."""
    from django_absurd_agents.worker_log import extra as _extra

    task: Any = {
        "task_name": "t",
        "task_id": uuid.uuid4(),
        "run_id": uuid.uuid4(),
        "attempt": 1,
        "max_attempts": 3,
        "params": {"secret": "s"},
    }
    fields = _extra(task, "agents", "completed", 1.0)["absurd_task"]
    assert set(fields) == {"name", "id", "run_id", "queue", "attempt", "max_attempts", "outcome", "duration"}
