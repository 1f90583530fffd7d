"""The Absurd schema as Django migrations: install, adopt, refuse, reverse, upgrade, provision queues.

Most tests run ``manage.py migrate`` in a subprocess against a scratch database of their own on the
test server, because what is under test is what a deploy does to a database: the migration
recorder, ``post_migrate`` and the exit status all take part. Each scratch database is dropped at
the end of its test.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import absurdctl
import psycopg
import pytest
from absurd_sdk import Absurd
from django.db import connection
from psycopg import sql
from psycopg.conninfo import make_conninfo

from django_absurd_agents import schema
from tests.schema_fakes import fake_version_sql

REPO = Path(__file__).resolve().parents[1]

# absurdctl 0.5.0, installed beside the venv by `make install` (pip install --target), so that the
# upgrade test runs the real older schema without reaching the network at test time.
OLD_ABSURDCTL = Path(os.environ.get("ABSURD_AGENTS_OLD_ABSURDCTL", Path(sys.prefix) / "absurdctl-0.5.0"))


def server_url(dbname: str) -> str:
    """A libpq URL for database ``dbname`` on the server the test database lives on."""
    params = connection.get_connection_params()
    keep = {k: v for k, v in params.items() if k in {"user", "password", "host", "port"} and v}
    return make_conninfo("", dbname=dbname, **keep)


@pytest.fixture
def scratch_db() -> Iterator[str]:
    """An empty database of this test's own; yields its URL and drops it afterwards."""
    name = f"absurd_agents_scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield server_url(name)
    finally:
        with psycopg.connect(server_url("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def manage_command(url: str, *args: str, settings: str = "tests.settings") -> list[str]:
    return [sys.executable, "-m", "django", *args, f"--settings={settings}"]


def manage_env(url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": url}


def manage(url: str, *args: str, settings: str = "tests.settings") -> subprocess.CompletedProcess[str]:
    """Run a management command against ``url`` the way a deploy would."""
    return subprocess.run(
        manage_command(url, *args, settings=settings),
        env=manage_env(url),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def fetch(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def version_of(url: str) -> str | None:
    rows = fetch(url, "select to_regprocedure('absurd.get_schema_version()') is not null")
    if not rows[0][0]:
        return None
    return str(fetch(url, "select absurd.get_schema_version()")[0][0])


def queues_of(url: str) -> list[str]:
    return [row[0] for row in fetch(url, "select queue_name from absurd.queues order by queue_name")]


def applied(url: str, app: str = "absurd_agents") -> list[str]:
    return [row[0] for row in fetch(url, "select name from django_migrations where app = %s order by id", [app])]


def app_tables(url: str) -> list[str]:
    return [
        row[0]
        for row in fetch(url, "select tablename from pg_tables where tablename like 'absurd\\_agents\\_%' order by 1")
    ]


def install_bundled_schema(conn: psycopg.Connection[Any], schema_sql: str) -> None:
    """What ``absurdctl init`` does: the whole schema script in one transaction."""
    with conn.transaction():
        conn.execute(schema_sql)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- install and adopt


def test_migrate_on_empty_database(scratch_db: str) -> None:
    out = ok(manage(scratch_db, "migrate", "--noinput"))
    assert "Applying absurd_agents.0001_absurd_schema... OK" in out
    assert "Created Absurd queue(s): agents, other" in out
    assert version_of(scratch_db) == schema.EXPECTED_VERSION
    assert queues_of(scratch_db) == ["agents", "other"]

    again = ok(manage(scratch_db, "migrate", "--noinput"))
    assert "No migrations to apply" in again
    assert "Created Absurd queue" not in again
    assert queues_of(scratch_db) == ["agents", "other"]
    # The live checks (schema version included) pass on the freshly migrated database.
    ok(manage(scratch_db, "check", "--database", "default"))


def test_migrate_adopts_schema_installed_by_absurdctl(scratch_db: str) -> None:
    with psycopg.connect(scratch_db) as conn:
        install_bundled_schema(conn, absurdctl.BUNDLED_SCHEMA_SQL)
        conn.autocommit = True
        app = Absurd(conn, queue_name="agents")
        app.create_queue("agents")
        spawned = app.spawn("analyse", {"question": "kept across adoption"}, queue="agents")

    out = ok(manage(scratch_db, "migrate", "--noinput"))
    assert "Applying absurd_agents.0001_absurd_schema... OK" in out
    assert "Created Absurd queue(s): other" in out  # "agents" was already there
    assert applied(scratch_db)[0] == "0001_absurd_schema"
    assert version_of(scratch_db) == schema.EXPECTED_VERSION
    assert queues_of(scratch_db) == ["agents", "other"]
    rows = fetch(
        scratch_db, "select task_name, params, state from absurd.t_agents where task_id = %s", [spawned["task_id"]]
    )
    assert rows == [("analyse", {"question": "kept across adoption"}, "pending")]


def test_migrate_onto_another_schema_version_stops_with_the_fix(scratch_db: str) -> None:
    with psycopg.connect(scratch_db) as conn:
        install_bundled_schema(conn, absurdctl.BUNDLED_SCHEMA_SQL)
        conn.execute(fake_version_sql("0.4.0"))
        conn.commit()

    result = manage(scratch_db, "migrate", "--noinput")
    assert result.returncode != 0
    assert f"Absurd schema version 0.4.0, but django-absurd-agents installs {schema.EXPECTED_VERSION}" in result.stderr
    assert "absurdctl migrate" in result.stderr
    assert "0001_absurd_schema" not in applied(scratch_db)
    assert version_of(scratch_db) == "0.4.0"  # untouched


@pytest.mark.django_db
def test_foreign_schema_named_absurd_is_refused() -> None:
    # Runs in the test's transaction, which is rolled back: the real schema comes back afterwards.
    with connection.cursor() as cursor:
        cursor.execute("alter schema absurd rename to absurd_set_aside")
        cursor.execute("create schema absurd")
        cursor.execute("create table absurd.notes (id int)")
    with pytest.raises(schema.SchemaVersionError, match=r"holds no Absurd installation.*Rename or drop"):
        schema.install_or_adopt(connection)


@pytest.mark.django_db
def test_empty_schema_named_absurd_is_installed_into() -> None:
    with connection.cursor() as cursor:
        cursor.execute("alter schema absurd rename to absurd_set_aside")
        cursor.execute("create schema absurd")
    assert schema.install_or_adopt(connection) == "installed"
    assert schema.installed_version(connection) == schema.EXPECTED_VERSION


# --------------------------------------------------------------------------- reversing


def test_reversing_refuses_by_default_and_drops_only_when_allowed(scratch_db: str) -> None:
    ok(manage(scratch_db, "migrate", "--noinput"))
    with psycopg.connect(scratch_db, autocommit=True) as conn:
        Absurd(conn, queue_name="agents").spawn("analyse", {"question": "precious"}, queue="agents")

    migrations_before = applied(scratch_db)
    tables_before = app_tables(scratch_db)

    refused = manage(scratch_db, "migrate", "absurd_agents", "zero", "--noinput")
    assert refused.returncode != 0
    assert "ALLOW_SCHEMA_DROP" in refused.stderr
    assert fetch(scratch_db, "select count(*) from absurd.t_agents") == [(1,)]
    # Refused before anything ran: the app's own tables (conversations, ...) are not dropped either.
    assert applied(scratch_db) == migrations_before
    assert app_tables(scratch_db) == tables_before

    ok(manage(scratch_db, "migrate", "absurd_agents", "zero", "--noinput", settings="tests.settings_allow_drop"))
    assert fetch(scratch_db, "select to_regnamespace('absurd')") == [(None,)]
    assert applied(scratch_db) == []

    # And forwards again: a fresh schema with the declared queues.
    out = ok(manage(scratch_db, "migrate", "--noinput"))
    assert "Created Absurd queue(s): agents, other" in out
    assert version_of(scratch_db) == schema.EXPECTED_VERSION


# --------------------------------------------------------------------------- concurrent deploys


def start_migrate(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        manage_command(url, "migrate", "--noinput"),
        env=manage_env(url),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lock_waiters(url: str, processes: list[subprocess.Popen[str]], count: int) -> None:
    """Poll until ``count`` sessions wait for ``schema.LOCK_KEY`` (a bigint advisory lock: classid is
    its high half, objid its low half); fail at once if one of ``processes`` exits first."""
    key = schema.LOCK_KEY
    deadline = time.monotonic() + 120
    while True:
        waiting = fetch(
            url,
            "select count(*) from pg_locks where locktype = 'advisory' and not granted "
            "and classid = %s and objid = %s and objsubid = 1",
            [key >> 32, key & 0xFFFFFFFF],
        )[0][0]
        if waiting == count:
            return
        exited = [p for p in processes if p.poll() is not None]
        assert not exited, "a process exited before reaching the lock:\n" + "".join(
            out + err for p in exited for out, err in [p.communicate()]
        )
        assert time.monotonic() < deadline, f"{count} sessions never waited for the schema lock together"
        time.sleep(0.05)


def test_two_migrates_at_the_same_moment_on_a_fresh_database_both_succeed(scratch_db: str) -> None:
    """Two deploys migrate an empty database at once: one applies everything, the other waits and
    finds nothing left to do. Without the lock the second fails (``django_migrations`` or ``schema
    "absurd"`` already exists). Holding the lock until both wait makes the race certain."""
    with psycopg.connect(scratch_db, autocommit=True) as holder:
        holder.execute("select pg_advisory_lock(%s)", [schema.LOCK_KEY])
        deploys = [start_migrate(scratch_db) for _ in range(2)]
        try:
            wait_for_lock_waiters(scratch_db, deploys, 2)
            # Neither got past the lock, not even to creating Django's own table: the race is certain.
            assert fetch(scratch_db, "select to_regclass('django_migrations')") == [(None,)]
        finally:
            holder.execute("select pg_advisory_unlock(%s)", [schema.LOCK_KEY])
            outputs = [p.communicate(timeout=180) for p in deploys]

    for deploy, (out, err) in zip(deploys, outputs, strict=True):
        assert deploy.returncode == 0, out + err
    installs = [out for out, _ in outputs if "Applying absurd_agents.0001_absurd_schema... OK" in out]
    assert len(installs) == 1, outputs
    assert any("No migrations to apply" in out for out, _ in outputs), outputs
    assert all("Waiting for another migrate on this database to finish" in out for out, _ in outputs), outputs
    assert version_of(scratch_db) == schema.EXPECTED_VERSION
    assert queues_of(scratch_db) == ["agents", "other"]
    duplicates = fetch(scratch_db, "select app, name from django_migrations group by 1, 2 having count(*) > 1")
    assert duplicates == []
    shipped = sorted(path.stem for path in (Path(schema.__file__).parent / "migrations").glob("0*.py"))
    assert applied(scratch_db) == shipped  # each applied once, none missing


INSTALL_IN_A_TRANSACTION = """
import django
django.setup()
from django.db import connection, transaction
from django_absurd_agents import schema
with transaction.atomic():
    print(schema.install_or_adopt(connection), flush=True)
"""


def test_concurrent_schema_installs_outside_the_migrate_command_install_once(scratch_db: str) -> None:
    """What 0001 does, run by two processes at once without the command's lock (another app's
    ``migrate`` listed first, a hand-driven executor): the second waits for the first's transaction,
    then adopts what it installed instead of failing on ``schema "absurd" already exists``."""
    env = {**manage_env(scratch_db), "DJANGO_SETTINGS_MODULE": "tests.settings"}
    with psycopg.connect(scratch_db) as holder:
        holder.execute("select pg_advisory_xact_lock(%s)", [schema.LOCK_KEY])
        installers = [
            subprocess.Popen(
                [sys.executable, "-c", INSTALL_IN_A_TRANSACTION],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            wait_for_lock_waiters(scratch_db, installers, 2)
        finally:
            holder.commit()
            outputs = [p.communicate(timeout=120) for p in installers]
    for installer, (out, err) in zip(installers, outputs, strict=True):
        assert installer.returncode == 0, out + err
    assert sorted(out.strip() for out, _ in outputs) == ["adopted", "installed"]
    assert version_of(scratch_db) == schema.EXPECTED_VERSION


def test_two_concurrent_migrates_provision_queues_once(scratch_db: str) -> None:
    ok(manage(scratch_db, "migrate", "--noinput"))
    with psycopg.connect(scratch_db, autocommit=True) as conn:
        conn.execute("select absurd.drop_queue('agents')")
        conn.execute("select absurd.drop_queue('other')")
    assert queues_of(scratch_db) == []

    # Hold the schema lock (migrate and queue provisioning share it) so that both deploys certainly
    # run at the same time, then let them race for it.
    with psycopg.connect(scratch_db) as holder:
        holder.execute("select pg_advisory_xact_lock(%s)", [schema.LOCK_KEY])
        deploys = [start_migrate(scratch_db) for _ in range(2)]
        try:
            wait_for_lock_waiters(scratch_db, deploys, 2)
        finally:
            holder.commit()
        outputs = [p.communicate(timeout=120) for p in deploys]

    for deploy, (out, err) in zip(deploys, outputs, strict=True):
        assert deploy.returncode == 0, out + err
    created = [out for out, _ in outputs if "Created Absurd queue(s): agents, other" in out]
    assert len(created) == 1, outputs
    assert not any("Created Absurd queue" in out for out, _ in outputs if out not in created)
    assert queues_of(scratch_db) == ["agents", "other"]


# --------------------------------------------------------------------------- upgrades


def load_old_absurdctl() -> ModuleType:
    module_file = OLD_ABSURDCTL / "absurdctl" / "__init__.py"
    if not module_file.is_file():
        pytest.skip(
            f"absurdctl 0.5.0 not found at {OLD_ABSURDCTL}: `make install` puts it there "
            "(pip install --no-deps --target .venv/absurdctl-0.5.0 absurdctl==0.5.0)"
        )
    spec = importlib.util.spec_from_file_location("absurdctl_0_5_0", module_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.ABSURD_SCHEMA_TARGET_VERSION == "0.5.0"
    return module


def old_release_tasks(conn: psycopg.Connection[Any], calls: list[tuple[str, int]]) -> Absurd:
    """Tasks with a checkpoint and a durable wait, the kind of state an upgrade must not lose."""
    app = Absurd(conn, queue_name="agents")

    @app.register_task(name="gated")
    def gated(params: Any, ctx: Any) -> dict[str, int]:
        def first() -> int:
            calls.append(("first", params["n"]))
            return int(params["n"])

        def second() -> int:
            calls.append(("second", params["n"]))
            return value * 10

        value = ctx.step("first", first)
        ctx.await_event(f"go:{params['n']}")
        return {"value": ctx.step("second", second)}

    @app.register_task(name="double")
    def double(params: Any, ctx: Any) -> dict[str, int]:
        return {"value": ctx.step("double", lambda: params["n"] * 2)}

    return app


def task_states(url: str) -> dict[str, str]:
    return {str(task_id): state for task_id, state in fetch(url, "select task_id, state from absurd.t_agents")}


def checkpoints(url: str) -> list[tuple[str, Any]]:
    return fetch(url, "select checkpoint_name, state from absurd.c_agents order by checkpoint_name")


def test_upgrade_migration_keeps_tasks_on_a_database_holding_tasks(scratch_db: str) -> None:
    old = load_old_absurdctl()
    calls: list[tuple[str, int]] = []

    # The database as an earlier release left it: Absurd 0.5.0 installed by 0001, tasks in flight.
    with psycopg.connect(scratch_db) as conn:
        install_bundled_schema(conn, old.BUNDLED_SCHEMA_SQL)
        conn.autocommit = True
        app = old_release_tasks(conn, calls)
        app.create_queue("agents")
        waiting = app.spawn("gated", {"n": 4})["task_id"]
        done = app.spawn("double", {"n": 21})["task_id"]
        app.work_batch(claim_timeout=30, batch_size=2)
        pending = app.spawn("gated", {"n": 5})["task_id"]
    assert version_of(scratch_db) == "0.5.0"
    before = task_states(scratch_db)
    assert before == {str(waiting): "sleeping", str(done): "completed", str(pending): "pending"}
    assert calls == [("first", 4)]
    checkpoints_before = checkpoints(scratch_db)
    assert ("first", 4) in checkpoints_before
    ok(manage(scratch_db, "migrate", "absurd_agents", "0001", "--fake", "--noinput", settings="tests.settings_upgrade"))

    # The new release: its upgrade migration runs absurdctl's 0.5.0-0.5.1.sql.
    out = ok(manage(scratch_db, "migrate", "--noinput", settings="tests.settings_upgrade"))
    assert "Applying absurd_agents.0003_absurd_0_5_1... OK" in out
    assert version_of(scratch_db) == "0.5.1"
    assert task_states(scratch_db) == before
    assert checkpoints(scratch_db) == checkpoints_before

    # The tasks carry on under the new schema: the checkpoint is replayed, not re-run.
    with psycopg.connect(scratch_db, autocommit=True) as conn:
        app = old_release_tasks(conn, calls)
        app.emit_event("go:4", {})
        app.emit_event("go:5", {})
        app.work_batch(claim_timeout=30, batch_size=5)
        results = {task_id: app.fetch_task_result(task_id) for task_id in (waiting, done, pending)}
    assert {task_id: (r.state, r.result) for task_id, r in results.items() if r} == {
        waiting: ("completed", {"value": 40}),
        done: ("completed", {"value": 42}),
        pending: ("completed", {"value": 50}),
    }
    assert Counter(calls) == Counter({("first", 4): 1, ("second", 4): 1, ("first", 5): 1, ("second", 5): 1})


def test_fresh_install_with_an_upgrade_migration_in_the_chain(scratch_db: str) -> None:
    # 0001 installs the bundled (newest) schema directly; the upgrade migration then finds it current.
    out = ok(manage(scratch_db, "migrate", "--noinput", settings="tests.settings_upgrade"))
    assert "Applying absurd_agents.0003_absurd_0_5_1... OK" in out
    assert version_of(scratch_db) == schema.EXPECTED_VERSION == "0.5.1"


@pytest.mark.django_db
def test_upgrade_steps_skip_a_current_schema_and_refuse_an_unexpected_one() -> None:
    assert schema.upgrade(connection, "0.5.0", schema.EXPECTED_VERSION) == "current"
    # A fresh install runs 0001 with the newest SQL, then every older upgrade step of the chain.
    assert schema.upgrade(connection, "0.4.0", "0.5.0") == "current"
    with pytest.raises(schema.SchemaVersionError, match=r"no upgrade script 0\.5\.1-9\.9\.9\.sql"):
        schema.upgrade(connection, schema.EXPECTED_VERSION, "9.9.9")
    with connection.cursor() as cursor:  # rolled back with the test's transaction
        cursor.execute(fake_version_sql("0.4.0").as_string(connection.connection))
    with pytest.raises(schema.SchemaVersionError, match=r"from 0\.4\.0 to 0\.5\.1: this migration expects 0\.5\.0"):
        schema.upgrade(connection, "0.5.0", "0.5.1")
