"""Install as users do: the wheel and the sdist built with ``python -m build``, installed in a clean venv.

One slow test walks a user's path: build from the tracked files only, install the wheel (dependencies
from the registry, pinned by requirements-dev.txt) in a fresh venv, then in a small project: ``migrate``,
a ``@task`` enqueued and run by ``absurd_worker``, the error for a model provider that is not installed,
the sdist installed over the wheel, and ``manage.py check`` with django-absurd in the same project.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
DATABASE = f"absurd_agents_packaging{os.environ.get('PYTEST_XDIST_WORKER', '')}"


SETTINGS = """
    import os

    from django_absurd_agents import database_config

    SECRET_KEY = "packaging"
    USE_TZ = True
    INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", *EXTRA_APPS, "django_absurd_agents", "shop"]
    DATABASES = {"default": database_config()}
    ABSURD_AGENTS = {"QUEUES": ["agents"]}
    TASKS = {"default": {"BACKEND": "django_absurd_agents.backends.AbsurdTaskBackend"}}
"""

TASKS = """
    from django.tasks import task


    @task
    def total(prices):
        return sum(prices)
"""

ENQUEUE = """
    import django

    django.setup()
    from shop.tasks import total

    print(total.enqueue([1, 2, 3]).id)
"""

RESULT = """
    import sys

    import django

    django.setup()
    from shop.tasks import total

    result = total.get_result(sys.argv[1])
    print(result.status, result.return_value)
"""


def run(*command: str | Path, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def database() -> str:
    """A database of its own (dropped and created again), on the test server."""
    from django.db import connection

    params = {k: v for k, v in connection.get_connection_params().items() if k in {"user", "password", "host", "port"}}
    with psycopg.connect(make_conninfo("", dbname="postgres", **params), autocommit=True) as admin:
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(DATABASE)))
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(DATABASE)))
    url = make_conninfo("", dbname=DATABASE, **params)
    parts = conninfo_to_dict(url)
    host = parts.get("host", "")
    return f"postgresql://{parts.get('user', 'postgres')}@/{DATABASE}?host={host}&port={parts.get('port', 5432)}"


def test_a_missing_provider_names_the_extra_to_install() -> None:
    from django_absurd_agents.worker_config import WorkerError, discover_tasks

    with pytest.raises(WorkerError) as raised:
        discover_tasks(["tests.provider_missing"])
    message = str(raised.value)
    assert "Importing 'tests.provider_missing' from ABSURD_AGENTS['TASK_MODULES'] failed" in message
    assert 'pip install "django-absurd-agents[openai]"' in message and "The dotted path is fine" in message
    with pytest.raises(WorkerError, match="Fix the dotted path"):
        discover_tasks(["tests.no_such_module"])


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_wheel_and_sdist_install_and_run_in_a_clean_venv(tmp_path: Path, database: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "VIRTUAL_ENV", "PYTHONPATH"))}
    source = tmp_path / "source"
    source.mkdir()
    listed = run("git", "ls-files", "-z", cwd=ROOT, env=env)
    if listed.returncode == 0:
        tracked = listed.stdout.split("\0")
    else:  # not a git checkout (an exported tree): every file but the local state
        skip = {".git", ".venv", ".postgres", "build", "dist", "site", "__pycache__", ".mypy_cache", ".ruff_cache"}
        tracked = [
            str(path.relative_to(ROOT))
            for path in ROOT.rglob("*")
            if path.is_file()
            and not skip & set(path.relative_to(ROOT).parts)
            and ".venv" not in str(path)
            and ".egg-info" not in str(path)
        ]
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    dist = tmp_path / "dist"
    ok(run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, source, cwd=source, env=env))
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "django_absurd_agents/py.typed" in names and "django_absurd_agents/migrations/0001_absurd_schema.py" in names
    assert any(n.startswith("django_absurd_agents/templates/") for n in names)
    for extra in ("embedded", "openai", "anthropic", "google", "groq", "mistral", "bedrock", "ag-ui"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "django_absurd_agents = django_absurd_agents.pytest_plugin" in entry_points

    venv = tmp_path / "venv"
    ok(run(sys.executable, "-m", "venv", venv, cwd=tmp_path, env=env))
    python = venv / "bin" / "python"
    ok(
        run(
            python, "-m", "pip", "install", "--quiet", wheel, "-c", ROOT / "requirements-dev.txt", cwd=tmp_path, env=env
        )
    )

    project = tmp_path / "project"
    (project / "shop").mkdir(parents=True)
    (project / "shop" / "__init__.py").write_text("")
    (project / "shop" / "tasks.py").write_text(textwrap.dedent(TASKS))
    (project / "settings.py").write_text("EXTRA_APPS = []\n" + textwrap.dedent(SETTINGS))
    (project / "enqueue.py").write_text(textwrap.dedent(ENQUEUE))
    (project / "result.py").write_text(textwrap.dedent(RESULT))
    project_env = {**env, "DJANGO_SETTINGS_MODULE": "settings", "PYTHONPATH": str(project), "DATABASE_URL": database}
    manage = [python, "-m", "django"]
    ok(run(*manage, "migrate", "--verbosity", "0", cwd=project, env=project_env))
    task_id = ok(run(python, "enqueue.py", cwd=project, env=project_env)).strip()
    ok(run(*manage, "absurd_worker", "--burst", "--poll-interval", "0.05", cwd=project, env=project_env))
    assert ok(run(python, "result.py", task_id, cwd=project, env=project_env)).split() == ["SUCCESSFUL", "6"]

    # A model provider whose library is not installed: the worker says which extra installs it.
    (project / "shop" / "tasks.py").write_text(
        textwrap.dedent(TASKS) + '\nfrom pydantic_ai import Agent\n\nagent = Agent("openai:gpt-5.2")\n'
    )
    failed = run(*manage, "absurd_worker", "--burst", cwd=project, env=project_env)
    assert failed.returncode != 0
    assert 'pip install "django-absurd-agents[openai]"' in failed.stderr and "dotted path is fine" in failed.stderr
    (project / "shop" / "tasks.py").write_text(textwrap.dedent(TASKS))

    # The sdist builds and installs too (over the wheel, same dependencies).
    install_sdist = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", sdist]
    ok(run(*install_sdist, cwd=tmp_path, env=env))
    ok(run(*manage, "check", cwd=project, env=project_env))

    # django-absurd in the same project: `check` explains the clash instead of Django silently picking a command.
    django_absurd = [
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "django-absurd==1.0.1",
        "-c",
        ROOT / "requirements-dev.txt",
    ]
    ok(run(*django_absurd, cwd=tmp_path, env=env))
    (project / "settings.py").write_text('EXTRA_APPS = ["django_absurd"]\n' + textwrap.dedent(SETTINGS))
    clash = run(*manage, "check", cwd=project, env=project_env)
    assert clash.returncode != 0
    assert "absurd_agents.E040" in clash.stderr and "absurd_agents.W040" in clash.stderr
    assert "manage.py absurd_worker` runs the command of 'django_absurd'" in clash.stderr
    help_text = " ".join(ok(run(*manage, "help", "absurd_agents_worker", cwd=project, env=project_env)).split())
    assert "Run what is waiting, then exit 0." in help_text  # ours, whichever app owns absurd_worker
