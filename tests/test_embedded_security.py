"""The embedded PostgreSQL is private to the project's user (issue 12, item 7).

The cluster trusts whoever reaches its socket, so the socket is the boundary: ``run/`` is 0700 and
owned by the server's user, the socket is 0700, the log (it records failed statements with their
values) and the lock files are 0600 and owned by the project's user.

Under root (CI) every check also runs as a real other OS user: a forked child drops to a user that is
neither us nor the server's user (``nobody`` when the server runs as ``postgres``) and tries to
connect, to see the socket and to read the log. The same probe run as the server's own user does
connect, so a failure of the outsider is the permissions at work, not a broken probe. Not root, a
process cannot become another user; then the modes and owners are asserted.

Every wait polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from django_absurd_agents import embedded, embedded_os
from django_absurd_agents.embedded import EmbeddedServer, ensure_server

DEADLINE = 15.0
OUTSIDER_CANDIDATES = ("nobody", "daemon", "bin", "sys", "games", "man", "lp", "mail", "news", "www-data")
IS_ROOT = os.geteuid() == 0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork, setuid and /proc")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def server_user(server: EmbeddedServer) -> embedded_os._User:
    """The OS user the postmaster runs as, read from /proc."""
    status = Path(f"/proc/{server.pid}/status").read_text().splitlines()
    uid = int(next(line for line in status if line.startswith("Uid:")).split()[1])
    gid = int(next(line for line in status if line.startswith("Gid:")).split()[1])
    return embedded_os._user_with_uid(uid, gid)


def outsider(*excluded_uids: int) -> embedded_os._User:
    """A local user that is neither root, nor us, nor the server's user."""
    for name in OUTSIDER_CANDIDATES:
        user = embedded_os._user_named(name)
        if user is not None and user.uid != 0 and user.uid not in excluded_uids:
            return user
    raise AssertionError(f"none of the users {OUTSIDER_CANDIDATES} exists to play the other local user")


def probe(server: EmbeddedServer) -> dict[str, str]:
    """What the current process can do to the server: each attempt is 'ok' or the error's name."""
    results: dict[str, str] = {}
    socket_path = server.socket_dir / f".s.PGSQL.{server.port}"

    def attempt(name: str, action: Any) -> None:
        try:
            action()
        except Exception as exc:  # the probe reports every failure, it does not judge it
            results[name] = f"{type(exc).__name__}: {exc}"
        else:
            results[name] = "ok"

    def raw_connect() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(socket_path))

    def connect_as_superuser() -> None:
        with psycopg.connect(server.url(), connect_timeout=5) as conn:
            conn.execute("select 1")

    attempt("stat_socket", lambda: os.stat(socket_path))
    attempt("list_socket_dir", lambda: os.listdir(server.socket_dir))
    attempt("socket_connect", raw_connect)
    attempt("psycopg_connect", connect_as_superuser)
    attempt("read_log", lambda: server.log_file.read_bytes())
    return results


def probe_as(user: embedded_os._User, server: EmbeddedServer) -> dict[str, str]:
    """Run :func:`probe` in a forked child that became ``user`` (needs root)."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # The child only makes a few system calls and a libpq connection, then _exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
            assert os.geteuid() == user.uid and os.getegid() == user.gid
            payload = json.dumps(probe(server)).encode()
        except BaseException as exc:
            payload = json.dumps({"child_failed": repr(exc)}).encode()
            status = 1
        try:
            os.write(write_end, payload)
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + DEADLINE
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the probe as {user.name} did not finish within {DEADLINE}s")
            ready, _, _ = select.select([read_end], [], [], remaining)
            if ready:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, 9)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    results: dict[str, str] = json.loads(b"".join(chunks))
    assert "child_failed" not in results, results
    return results


def log_a_failed_statement(server: EmbeddedServer) -> str:
    """Make the server log a failed statement holding a secret value; return the secret."""
    secret = f"secret-{uuid.uuid4().hex}"
    with (
        psycopg.connect(server.url(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InvalidTextRepresentation),
    ):
        # Bound client-side, as Django's psycopg backend does: the value is in the logged statement.
        conn.execute(psycopg.sql.SQL("select {}::int").format(psycopg.sql.Literal(secret)))
    deadline = time.monotonic() + DEADLINE
    while secret.encode() not in server.log_file.read_bytes():
        assert time.monotonic() < deadline, "the failed statement never reached the log"
        time.sleep(0.01)
    return secret


def stop_and_wait(requested: Path) -> None:
    with contextlib.redirect_stderr(io.StringIO()):
        embedded.main(["--data-dir", str(requested), "stop"])
    layout = embedded_os._layout(requested, embedded_os._default_run_as())
    deadline = time.monotonic() + DEADLINE
    while embedded.find_server(requested) is not None or layout.pidfile.exists():
        assert time.monotonic() < deadline, "postgres did not stop"
        time.sleep(0.01)


@contextlib.contextmanager
def fresh_cluster(requested: Path) -> Iterator[EmbeddedServer]:
    """A cluster of this test's own, stopped and removed (with its /tmp fallback area) afterwards."""
    started = ensure_server(requested)
    try:
        yield started
    finally:
        started.stop()
        stop_and_wait(requested)
        shutil.rmtree(embedded_os._tmp_area(requested), ignore_errors=True)


@pytest.fixture(params=["default", "nobody"] if IS_ROOT else ["default"])
def server(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedServer]:
    """A fresh cluster; under root once as the default server user (``postgres``), once as ``nobody``."""
    if request.param == "nobody":
        monkeypatch.setattr(embedded_os, "_RUN_AS_CANDIDATES", ("nobody",))
    with fresh_cluster(tmp_path / "pg") as started:
        yield started


def assert_private_modes(server: EmbeddedServer) -> None:
    socket_path = server.socket_dir / f".s.PGSQL.{server.port}"
    server_uid = server_user(server).uid
    assert mode(server.socket_dir) == 0o700
    assert os.lstat(server.socket_dir).st_uid == server_uid
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
    assert mode(socket_path) == 0o700
    for private in (server.log_file, server.base_dir / ".lock", server.base_dir / ".users.lock"):
        assert mode(private) == 0o600, private
        assert os.lstat(private).st_uid == os.geteuid(), private
    assert mode(server.data_dir) == 0o700
    assert mode(server.base_dir) & 0o077 in (0o000, 0o011), oct(mode(server.base_dir))
    with psycopg.connect(server.url()) as conn:
        assert conn.execute("select current_setting('unix_socket_permissions')").fetchone() == ("0700",)


def test_only_the_projects_user_and_the_servers_user_can_connect_or_read_the_log(server: EmbeddedServer) -> None:
    secret = log_a_failed_statement(server)
    assert_private_modes(server)

    ours = probe(server)  # the project's user (root in CI) connects and reads the log
    assert set(ours.values()) == {"ok"}, ours

    if not IS_ROOT:
        return  # only root can become another user; the modes above are the whole proof then
    owner = server_user(server)
    assert owner.uid != 0
    own = probe_as(owner, server)  # the probe can connect: the server's own user does
    assert own["socket_connect"] == "ok" and own["psycopg_connect"] == "ok", own
    assert own["read_log"].startswith("PermissionError"), own  # the log is the project's user's alone

    other = outsider(os.geteuid(), owner.uid)
    theirs = probe_as(other, server)
    for name in ("stat_socket", "list_socket_dir", "socket_connect", "read_log"):
        assert theirs[name].startswith("PermissionError"), (other.name, name, theirs)
    assert theirs["psycopg_connect"].startswith("OperationalError"), theirs
    assert "Permission denied" in theirs["psycopg_connect"], theirs
    assert secret not in json.dumps(theirs)


ATTACH = """
import sys
from django_absurd_agents.embedded import ensure_server
print(ensure_server(sys.argv[1]).owned, flush=True)
"""


def test_a_cluster_left_open_by_an_earlier_release_is_narrowed(tmp_path: Path) -> None:
    """run/ 0755, a 0644 log and lock (what earlier releases made): narrowed by a process that finds the
    server running, and by the next start."""
    requested = tmp_path / "pg"
    with fresh_cluster(requested) as server:
        locks = (server.base_dir / ".lock", server.base_dir / ".users.lock")
        for path, loose in ((server.socket_dir, 0o755), (server.log_file, 0o644), *((lock, 0o644) for lock in locks)):
            os.chmod(path, loose)

        other = subprocess.run(
            [sys.executable, "-c", ATTACH, str(requested)], capture_output=True, text=True, timeout=60, check=False
        )
        assert other.returncode == 0 and other.stdout.strip() == "False", other.stdout + other.stderr
        assert mode(server.socket_dir) == 0o700
        assert mode(server.log_file) == 0o600
        assert all(mode(lock) == 0o600 for lock in locks)

        server.stop()
        os.chmod(server.socket_dir, 0o755)
        os.chmod(server.log_file, 0o644)
        restarted = ensure_server(requested)
        assert restarted.owned and restarted.pid != server.pid
        try:
            assert_private_modes(restarted)
        finally:
            restarted.stop()
