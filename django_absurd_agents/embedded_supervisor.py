"""The supervisor of one embedded PostgreSQL: it runs the server and stops it once no process uses it.

Every user of the server holds a shared ``flock`` on ``.users.lock`` while it lives (the kernel drops
it however the process ends, ``kill -9`` included). This process blocks for an exclusive lock on the
same file, which it gets exactly when the last user is gone, then fast-shuts-down the server (SIGINT:
clients disconnected, shared memory removed, no recovery at the next start) and exits. It is the
server's parent and arms the parent-death signal, so a killed supervisor takes the server along. It
detaches from its starter (fork, ``setsid``), which may be killed or get the terminal's Ctrl-C. When
the server exits by itself, SIGCHLD interrupts the wait and the supervisor writes the server's status
to the starter's pipe and exits. Every start waits for it, so it starts in about 10 ms: run as a file
with ``python -I -S``, standard library only, the server forked before anything else is imported.

Usage: ``embedded_supervisor.py USERS_LOCK STATUS_FD UID GID GROUPS -- POSTGRES [ARG...]``; ``UID``
and ``GID`` are -1 to keep ours, ``GROUPS`` a comma-separated list of group ids.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import sys
import time

_PR_SET_PDEATHSIG = 1
_SIGINT = 2  # Linux's number, for the parent-death signal (Linux only), without importing ``signal`` first


class _ServerExited(Exception):
    """Raised by the SIGCHLD handler, so that it interrupts the blocking ``flock``."""


def _spawn(server: list[str], uid: int, gid: int, groups: list[int], status_fd: int) -> int:
    """Fork and exec the server as ``uid``; it gets SIGINT (a fast shutdown) if we die."""
    parent = os.getpid()
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform.startswith("linux") else None
    pid = os.fork()
    if pid:
        return pid
    try:
        os.close(status_fd)
        if uid >= 0:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)  # before prctl: a uid change clears the parent-death signal
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, _SIGINT, 0, 0, 0)
        if os.getppid() == parent:  # else we died already, and no signal would ever come
            os.execv(server[0], server)
    except BaseException as exc:
        os.write(2, f"embedded PostgreSQL supervisor: cannot run {server[0]}: {exc}\n".encode())
    os._exit(127)


def _report(status_fd: int, text: str) -> None:
    with contextlib.suppress(OSError):  # the starter stopped listening once the server answered
        os.write(status_fd, text.encode())


def _supervise(pid: int, users_lock: str, status_fd: int) -> int:
    """Wait until the server exits by itself (return 1) or its last user is gone (stop it, return 0).

    ``signal`` (5 ms of imports) comes once the server is forked; a server that exited before the
    handler was installed is caught by the ``WNOHANG`` look that follows.
    """
    import signal

    def server_exited(signum: int, frame: object) -> None:
        raise _ServerExited

    lock = os.open(users_lock, os.O_RDWR | os.O_CLOEXEC)
    last_user_gone = False
    status: int | None = None
    signal.signal(signal.SIGCHLD, server_exited)
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if not reaped:
            status = None
            fcntl.flock(lock, fcntl.LOCK_EX)  # returns once no user holds it shared
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            last_user_gone = True
    except _ServerExited:
        pass
    if not last_user_gone:
        with contextlib.suppress(ChildProcessError):  # else the look above reaped it
            status = os.waitpid(pid, 0)[1]
        _report(status_fd, "exited" if status is None else f"exited, status {os.waitstatus_to_exitcode(status)}")
        return 1
    for sig, grace in ((signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return 0  # the exclusive lock goes with us: a user waiting for it starts the next server
            time.sleep(0.005)
    os.waitpid(pid, 0)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 7 or argv[5] != "--":
        raise SystemExit(f"usage: {__doc__}")
    users_lock, status_fd, uid, gid, groups, _, *server = argv
    if os.fork():
        os._exit(0)  # the starter reaps this at once; the supervisor lives on, adopted by init
    os.setsid()
    group_ids = [int(group) for group in groups.split(",") if group]
    pid = _spawn(server, int(uid), int(gid), group_ids, int(status_fd))
    return _supervise(pid, users_lock, int(status_fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
