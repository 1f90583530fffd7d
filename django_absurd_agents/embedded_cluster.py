"""One embedded PostgreSQL cluster on disk: find its running server, create it, start it, stop it.

The launcher (:mod:`django_absurd_agents.embedded`) decides when; this module knows how, from what
PostgreSQL itself leaves behind: ``postmaster.pid`` (pid, data directory, port, socket directory)
and whether the socket answers. A pid file can outlive its server (a killed postmaster) or name a
pid since reused by another process, so nothing here trusts it without looking at the process and
connecting.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Literal, NamedTuple

import psycopg

from django_absurd_agents.embedded_os import (
    DATA_DIR_ENV,
    PORT,
    SOCKET_MODE,
    EmbeddedPostgresError,
    _check_binaries_usable,
    _child_env,
    _die_with_parent,
    _give_to,
    _Layout,
    _narrow_modes,
    _not_ours,
    _open_log,
    _prepare_socket_dir,
    _server_bin_dir,
    _traversable,
    _User,
    _user_args,
    _user_with_uid,
    spawn_supervisor,
)

SUPERUSER = "postgres"

_INITDB_TIMEOUT = 120.0
_START_TIMEOUT = 60.0
_ATTACH_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class Running(NamedTuple):
    """A server that accepts connections for the cluster; ``started`` if this call started it."""

    pid: int
    socket_dir: Path
    port: int
    started: bool


class _PidFile(NamedTuple):
    pid: int
    data_dir: str
    port: int
    socket_dir: str | None


def _log_tail(path: Path, offset: int, lines: int = 40) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


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


def process_state(pid: int, data_dir: Path) -> Literal["gone", "postgres", "other"]:
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
    """2, 4, 8, 16, then 20 ms: a failed look costs a fraction of a millisecond (no socket yet, or
    "starting up"), and a longer pause would be added to every start it overshoots."""
    return min(0.002 * (2**attempt), 0.02)


def _running(layout: _Layout, info: _PidFile) -> Running:
    return Running(info.pid, Path(info.socket_dir) if info.socket_dir else layout.socket_dir, info.port, False)


def probe(layout: _Layout) -> Running | None:
    """One look, no waiting and no cleanup: the running server for ``layout``, if any."""
    info = _read_pidfile(layout.pidfile)
    if not isinstance(info, _PidFile) or process_state(info.pid, layout.data) != "postgres":
        return None
    found = _connect_data_directory(info.socket_dir or layout.socket_dir, info.port)
    if found is None or not _same_path(found, layout.data):
        return None
    return _running(layout, info)


def _clear_stale(layout: _Layout) -> None:
    """Remove the lock files a dead (or pid-reused) postmaster left in our directories."""
    layout.pidfile.unlink(missing_ok=True)
    (layout.socket_dir / f".s.PGSQL.{PORT}.lock").unlink(missing_ok=True)
    (layout.socket_dir / f".s.PGSQL.{PORT}").unlink(missing_ok=True)


def attach_or_clear(layout: _Layout) -> Running | None:
    """The running server for ``layout``, waiting while one is starting or shutting down; else clean up.

    Called with the start lock held. A postmaster still finishing its shutdown (``stop`` was just
    run) is waited for, so the new server does not trip over its pid file and shared memory.
    """
    deadline = time.monotonic() + _ATTACH_TIMEOUT
    attempt = 0
    while True:
        info = _read_pidfile(layout.pidfile)
        if info is None:
            return None
        if info == "bogus" or process_state(info.pid, layout.data) != "postgres":
            _clear_stale(layout)
            return None
        assert isinstance(info, _PidFile)
        found = _connect_data_directory(info.socket_dir or layout.socket_dir, info.port)
        if found is not None:
            if _same_path(found, layout.data):
                _narrow_modes(Path(info.socket_dir or layout.socket_dir), layout.log)
                return _running(layout, info)
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
    cmd = [str(_server_bin_dir() / "initdb"), "-D", str(scratch), "-U", SUPERUSER, "--auth=trust"]
    cmd += ["--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"]
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


def start(layout: _Layout, run_as: _User | None) -> Running:
    """Create the cluster if needed and start its server under a supervisor; return once it answers.

    Called with the start lock and a shared hold on ``layout.users`` (the supervisor cannot stop the
    server before this process has had its turn as a user).
    """
    if run_as is not None:
        _check_binaries_usable(run_as)
    with _open_log(layout.log) as log:
        log_offset = log.seek(0, os.SEEK_END)
        if not (layout.data / "PG_VERSION").exists():
            _initdb(layout, run_as, log, log_offset)
        user = _server_user(layout, run_as)
        _prepare_socket_dir(layout.socket_dir, user)
        cmd = [str(_server_bin_dir() / "postgres"), "-D", str(layout.data), "-k", str(layout.socket_dir)]
        cmd += ["-p", str(PORT), "-c", "listen_addresses=", "-c", f"unix_socket_permissions={SOCKET_MODE:04o}"]
        launch = spawn_supervisor(cmd, user, layout.users, log)
    deadline = time.monotonic() + _START_TIMEOUT
    attempt = 0
    try:
        while _connect_data_directory(layout.socket_dir, PORT) is None:
            failure = launch.failure()
            if failure is not None:
                raise EmbeddedPostgresError(
                    f"PostgreSQL did not start ({failure}). Log {layout.log}:\n{_log_tail(layout.log, log_offset)}"
                )
            if time.monotonic() > deadline:
                info = _read_pidfile(layout.pidfile)
                if isinstance(info, _PidFile):
                    stop(layout, info.pid, timeout=5.0)
                raise EmbeddedPostgresError(
                    f"PostgreSQL did not accept connections within {_START_TIMEOUT:.0f}s. "
                    f"Log {layout.log}:\n{_log_tail(layout.log, log_offset)}"
                )
            time.sleep(_wait_backoff(attempt))
            attempt += 1
    finally:
        launch.close()
    info = _read_pidfile(layout.pidfile)
    if not isinstance(info, _PidFile):
        raise EmbeddedPostgresError(f"PostgreSQL answers but left no readable {layout.pidfile}")
    return Running(info.pid, layout.socket_dir, PORT, True)


def stop(layout: _Layout, pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """Fast-shut-down the postmaster ``pid`` of ``layout``, escalating if it overstays; ``True`` once it is gone.

    Its supervisor sees it exit and exits too. Every client, of every process, is disconnected.
    """
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        if process_state(pid, layout.data) != "postgres":
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        attempt = 0
        while process_state(pid, layout.data) == "postgres":
            if time.monotonic() > deadline:
                break
            time.sleep(_wait_backoff(attempt))
            attempt += 1
        else:
            return True
    return process_state(pid, layout.data) != "postgres"
