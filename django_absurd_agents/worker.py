"""The production worker behind ``manage.py absurd_worker``.

absurd-sdk's own ``start_worker`` claims a batch and waits for the whole batch before claiming again,
has no signal handling, and ends on the first database error. This worker instead:

* keeps ``concurrency`` slots busy: one claimer per queue claims as many tasks as there are free
  slots, and a slot that frees is refilled at once, so one slow agent run never idles the others;
* serves several queues from one process, the slots shared between them;
* stops claiming on SIGTERM/SIGINT and lets in-flight tasks finish within a grace period; a task
  still running after it is put back for another worker at once, and a second signal exits at once;
* survives database restarts: it logs, backs off and reconnects, and a task whose outcome could not
  be written is claimed again once its lease expires, so nothing is lost;
* runs each task like Django runs an ASGI request: synchronous ORM work (``sync_to_async``, the async
  ORM) gets a thread and a database connection of its own, closed when the task ends;
* logs one line per task start and end, and writes a heartbeat file for orchestrators.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from absurd_sdk import ClaimedTask
from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async
from django.db import connections
from django.utils.module_loading import autodiscover_modules
from pydantic_ai import Agent

from django_absurd_agents import conf, sdk
from django_absurd_agents.client import ProjectAbsurd, absurd
from django_absurd_agents.execution import execute_claimed
from django_absurd_agents.reconnect import is_misconfigured

logger = logging.getLogger("django_absurd_agents.worker")

_BACKOFF_FIRST = 0.25
_BACKOFF_CAP = 15.0
# A claim query outstanding this long means the connection hangs (a half-open TCP socket, say):
# the heartbeat file then stops moving so that a liveness probe restarts the process.
_STUCK_CLAIM_SECONDS = 60.0
# How long cancelled tasks get to unwind at the end of the grace period.
_CANCEL_WAIT = 0.5


MAX_CONCURRENCY = 10_000
MAX_CLAIM_TIMEOUT = 86_400
MAX_POLL_INTERVAL = 3_600.0


class WorkerError(Exception):
    """A configuration problem that keeps the worker from starting; the message names the fix."""


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker serves and how; ``from_settings`` fills the gaps from ``ABSURD_AGENTS``."""

    queues: tuple[str, ...]
    concurrency: int
    claim_timeout: int
    poll_interval: float
    shutdown_grace: float
    worker_id: str
    burst: bool = False
    max_tasks: int | None = None
    heartbeat_file: str | None = None
    connections: int = 0
    """Database connections per queue for running tasks; 0 means one per 4 slots, at most 8."""

    @classmethod
    def from_settings(
        cls,
        *,
        queues: Iterable[str] | None = None,
        concurrency: int | None = None,
        claim_timeout: int | None = None,
        poll_interval: float | None = None,
        shutdown_grace: float | None = None,
        worker_id: str | None = None,
        burst: bool = False,
        max_tasks: int | None = None,
        heartbeat_file: str | None = None,
        connections: int | None = None,
    ) -> WorkerConfig:
        settings = conf.get()
        config = cls(
            queues=tuple(dict.fromkeys(queues or ())) or settings.all_queues,
            concurrency=settings.concurrency if concurrency is None else concurrency,
            claim_timeout=settings.claim_timeout if claim_timeout is None else claim_timeout,
            poll_interval=settings.poll_interval if poll_interval is None else poll_interval,
            shutdown_grace=settings.shutdown_grace if shutdown_grace is None else shutdown_grace,
            worker_id=worker_id or f"{socket.gethostname()}:{os.getpid()}",
            burst=burst,
            max_tasks=max_tasks,
            heartbeat_file=heartbeat_file or settings.heartbeat_file,
            connections=connections or 0,
        )
        config.validate()
        return config

    def validate(self) -> None:
        for queue in self.queues:
            problem = conf.queue_name_error(queue)
            if problem:
                raise WorkerError(problem)
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise WorkerError(f"Concurrency must be between 1 and {MAX_CONCURRENCY}, not {self.concurrency}.")
        if self.claim_timeout < 1:
            # Absurd treats 0 as "no lease at all": a crashed worker's tasks would never be resumed.
            raise WorkerError(f"The claim timeout must be at least 1 second, not {self.claim_timeout}.")
        if self.claim_timeout > MAX_CLAIM_TIMEOUT:
            # A lease of years means a crashed worker's tasks are never resumed.
            raise WorkerError(
                f"The claim timeout must be at most {MAX_CLAIM_TIMEOUT} seconds (one day), not {self.claim_timeout}: "
                "a crashed worker's tasks wait that long to be resumed; keep it a few times your longest step."
            )
        if not 0 < self.poll_interval <= MAX_POLL_INTERVAL:  # also refuses NaN
            raise WorkerError(
                f"The poll interval must be a number of seconds above 0 and at most {MAX_POLL_INTERVAL:g}, "
                f"not {self.poll_interval}."
            )
        if not 0 <= self.shutdown_grace <= MAX_CLAIM_TIMEOUT:
            raise WorkerError(
                f"The shutdown grace period must be between 0 and {MAX_CLAIM_TIMEOUT} seconds, "
                f"not {self.shutdown_grace}."
            )
        if self.max_tasks is not None and self.max_tasks < 1:
            raise WorkerError(f"--max-tasks must be at least 1, not {self.max_tasks}.")
        if self.connections < 0:
            raise WorkerError(f"The number of connections cannot be negative ({self.connections}).")

    @property
    def execution_connections(self) -> int:
        """Connections per queue that running tasks share (opened only as load needs them).

        A task writes its checkpoints and outcome through one connection, and psycopg runs one
        query at a time per connection, so a single connection caps a queue at a few hundred
        short tasks a second whatever the concurrency (bench/bench_worker.py). Slow agent runs
        need few; a small pool keeps short tasks from queueing behind each other's writes.
        """
        return self.connections or min(8, max(1, -(-self.concurrency // 4)))


def discover_tasks(extra_modules: Iterable[str] | None = None) -> None:
    """Import every installed app's ``tasks`` module and the modules in ``TASK_MODULES``.

    Registration happens at import time (``@absurd.register_task``), so a worker that did not import
    the module would claim the task and fail it as unknown.
    """
    autodiscover_modules("tasks")
    modules = conf.get().task_modules if extra_modules is None else tuple(extra_modules)
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise WorkerError(
                f"Cannot import {module!r} from ABSURD_AGENTS['TASK_MODULES']: {exc}. "
                "Fix the dotted path or remove the entry."
            ) from exc


def is_connection_error(exc: BaseException) -> bool:
    """Errors after which the connection is gone and must be opened again."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError)


def misconfigured(exc: BaseException) -> WorkerError:
    alias = conf.get().database_alias
    return WorkerError(
        f"The database refused the worker's connection: {_one_line(exc)}. No retry can fix this: correct "
        f"DATABASES[{alias!r}] (NAME, USER, PASSWORD, HOST) or DATABASE_URL, or ABSURD_AGENTS['DATABASE_ALIAS']."
    )


def _close_connections() -> None:
    connections.close_all()


# Recent asgiref lets a ThreadSensitiveContext run on an executor the caller owns; older ones start their own thread.
_CONTEXT_TAKES_EXECUTOR = "executor" in inspect.signature(ThreadSensitiveContext.__init__).parameters


class _TaskThread(ThreadPoolExecutor):
    """The one thread a task's synchronous code runs on, started only if the task has any.

    Django's ``sync_to_async`` (and so the async ORM) and pydantic-ai's sync tools and callbacks
    all run here, so a task uses one Django connection of its own, like a request under ASGI, and
    the worker closes it when the task ends. Left to themselves, sync tools would run on anyio's
    shared threads, whose connections stay open, go stale across a database restart, and add up.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="absurd-task")
        self.used = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.used = True
        return super().submit(fn, *args, **kwargs)


@dataclass
class _Queue:
    name: str
    claimer: ProjectAbsurd
    executors: list[ProjectAbsurd]
    running: dict[int, int] = field(default_factory=dict)
    failures: int = 0
    claiming_since: float | None = None
    idle_generation: int = -1

    def pick_executor(self) -> int:
        """The least busy execution client; among equals one already connected, so idle ones stay closed."""

        def load(index: int) -> tuple[int, bool]:
            return self.running.get(index, 0), self.executors[index]._conn is None

        return min(range(len(self.executors)), key=load)


@dataclass
class _Execution:
    queue: _Queue
    task: ClaimedTask
    claimed_at: float
    started: float = field(default_factory=time.monotonic)


class Worker:
    """Claims and runs tasks from one or more queues until stopped. ``run()`` returns the exit code."""

    def __init__(self, config: WorkerConfig, app: ProjectAbsurd | None = None) -> None:
        self.config = config
        self.app = app or absurd
        self._queues: list[_Queue] = []
        self._executions: dict[asyncio.Task[None], _Execution] = {}
        self._reserved = 0
        self._claimed = 0
        self._generation = 0
        self._stopping = False
        self._grace_deadline: float | None = None
        self._signals = 0
        self._changed: asyncio.Condition | None = None
        self._stop_event: asyncio.Event | None = None
        self._signalled: asyncio.Event | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._cut_off = 0

    # --- slots ------------------------------------------------------------------------------------

    def _free_slots(self) -> int:
        free = self.config.concurrency - len(self._executions) - self._reserved
        if self.config.max_tasks is not None:
            free = min(free, self.config.max_tasks - self._claimed - self._reserved)
        return max(free, 0)

    def _exhausted(self) -> bool:
        return self.config.max_tasks is not None and self._claimed >= self.config.max_tasks

    # --- stopping ---------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop claiming; in-flight tasks finish (within the grace period when a signal asked)."""
        if self._stopping:
            return
        self._stopping = True
        logger.info("Stopping (%s): no new tasks are claimed; %d in flight.", reason, len(self._executions))
        if self._stop_event is not None:
            self._stop_event.set()
        if self._changed is not None:
            notify = asyncio.get_running_loop().create_task(self._notify())
            self._background.add(notify)  # the loop keeps only a weak reference to a task
            notify.add_done_callback(self._background.discard)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            logger.warning(
                "Second %s: exiting now; %d in-flight task(s) are resumed by a worker once their leases expire.",
                name,
                len(self._executions),
            )
            self._remove_heartbeat()
            exit_now(128 + signum)
        self._grace_deadline = time.monotonic() + self.config.shutdown_grace
        if self._signalled is not None:
            self._signalled.set()
        self.request_stop(
            f"{name}; in-flight tasks get {self.config.shutdown_grace:g}s to finish, send it again to exit at once"
        )

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up as soon as a stop is requested."""
        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    # --- the main loop ----------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> int:
        self._changed = asyncio.Condition()
        self._stop_event = asyncio.Event()
        self._signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
        self._queues = [self._make_queue(name) for name in self.config.queues]
        heartbeat: asyncio.Task[None] | None = None
        try:
            if not await self._wait_for_database():
                return 0
            self._log_banner()
            heartbeat = asyncio.create_task(self._heartbeat_loop())
            claimers = [asyncio.create_task(self._claim_loop(queue)) for queue in self._queues]
            await asyncio.gather(*claimers)
            if self._exhausted() and not self._stopping:
                logger.info("Claimed the %d task(s) of --max-tasks; finishing them.", self._claimed)
            await self._drain()
            logger.info("Worker %s stopped after %d task(s).", self.config.worker_id, self._claimed)
            return 0
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            self._remove_heartbeat()
            for queue in self._queues:
                for client in (queue.claimer, *queue.executors):
                    with contextlib.suppress(Exception):
                        await client.close()
            if self._cut_off:
                # Returning would wait for those calls: asyncio.run() and the interpreter join them.
                exit_now(0)
            if handle_signals:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)

    def _make_queue(self, name: str) -> _Queue:
        # Claims go through a connection of their own, so a poll never waits behind the checkpoint
        # writes of running tasks.
        executors = [self.app.for_queue(name) for _ in range(self.config.execution_connections)]
        return _Queue(name=name, claimer=self.app.for_queue(name), executors=executors)

    async def _wait_for_database(self) -> bool:
        """Check the queues exist, waiting (with backoff) while the database is unreachable.

        Returns False when a stop was requested before the database answered.
        """
        client = self._queues[0].claimer
        failures = 0
        while not self._stopping:
            try:
                live = await client.live_connection()
                cursor = await live.execute(
                    "select queue_name from absurd.queues where queue_name = any(%s)", [list(self.config.queues)]
                )
                present = {row[0] for row in await cursor.fetchall()}
            except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName) as exc:
                raise WorkerError(
                    "The Absurd schema is not installed in this database. Run `manage.py migrate` first."
                ) from exc
            except Exception as exc:
                if is_misconfigured(exc):
                    raise misconfigured(exc) from exc
                if not is_connection_error(exc):
                    raise
                failures += 1
                delay = self._backoff(failures)
                logger.warning("Database unreachable (%s); retrying in %.1fs.", _one_line(exc), delay)
                with contextlib.suppress(Exception):
                    await client.close()
                await self._pause(delay)
                continue
            missing = [q for q in self.config.queues if q not in present]
            if missing:
                raise WorkerError(
                    f"Queue(s) {', '.join(missing)} do not exist in the database. Add them to "
                    "ABSURD_AGENTS['QUEUES'] and run `manage.py migrate`, or pass existing queues with --queue."
                )
            return True
        return False

    def _log_banner(self) -> None:
        registry = sdk.registry(self.app)
        served = set(self.config.queues)
        by_queue: dict[str, list[str]] = {q: [] for q in self.config.queues}
        elsewhere: list[str] = []
        for name, registration in sorted(registry.items()):
            if registration["queue"] in served:
                by_queue[registration["queue"]].append(name)
            else:
                elsewhere.append(f"{name} ({registration['queue']})")
        tasks = "; ".join(f"{q}: {', '.join(names) or '(none)'}" for q, names in by_queue.items())
        logger.info(
            "Worker %s serving queue(s) %s with %d slot(s) (up to %d database connections per queue), "
            "claim timeout %ds, poll every %gs%s. Tasks: %s.",
            self.config.worker_id,
            ", ".join(self.config.queues),
            self.config.concurrency,
            self.config.execution_connections + 1,
            self.config.claim_timeout,
            self.config.poll_interval,
            ", burst mode" if self.config.burst else "",
            tasks,
        )
        if elsewhere:
            logger.info("Registered for queues this worker does not serve: %s.", ", ".join(elsewhere))
        for queue, names in by_queue.items():
            if not names:
                logger.warning(
                    "No task is registered for queue %r in this process: every task claimed from it will fail as "
                    "unknown. Register tasks in an installed app's tasks.py or list their modules in "
                    "ABSURD_AGENTS['TASK_MODULES'].",
                    queue,
                )

    @staticmethod
    def _backoff(failures: int) -> float:
        delay = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2 ** (failures - 1))
        return delay * random.uniform(0.8, 1.2)

    async def _claim_loop(self, queue: _Queue) -> None:
        assert self._changed is not None
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._stopping or self._exhausted() or self._free_slots() > 0)
                if self._stopping or self._exhausted():
                    return
                wanted = self._free_slots()
                self._reserved += wanted
                generation = self._generation
            tasks: list[ClaimedTask] = []
            error: Exception | None = None
            queue.claiming_since = claim_sent = time.monotonic()
            try:
                tasks = await queue.claimer.claim_tasks(
                    batch_size=wanted, claim_timeout=self.config.claim_timeout, worker_id=self.config.worker_id
                )
            except Exception as exc:
                error = exc
            finally:
                queue.claiming_since = None
                async with self._changed:
                    self._reserved -= wanted
                    self._claimed += len(tasks)
                    if tasks:
                        self._generation += 1
                    for task in tasks:
                        self._start(queue, task, claim_sent)
                    self._changed.notify_all()
            if error is not None:
                await self._claim_failed(queue, error)
                continue
            if queue.failures:
                logger.info("Queue %s: database reachable again after %d failed claim(s).", queue.name, queue.failures)
                queue.failures = 0
            if len(tasks) < wanted:
                if self.config.burst and not tasks and not self._executions and generation == self._generation:
                    queue.idle_generation = generation
                    if all(q.idle_generation == generation for q in self._queues):
                        self.request_stop("burst mode: every queue is drained")
                        return
                await self._pause(self.config.poll_interval)

    async def _claim_failed(self, queue: _Queue, exc: Exception) -> None:
        if is_misconfigured(exc):
            raise misconfigured(exc) from exc
        queue.failures += 1
        delay = self._backoff(queue.failures)
        if is_connection_error(exc):
            logger.warning(
                "Queue %s: cannot claim, the database connection failed (%s); reconnecting in %.1fs.",
                queue.name,
                _one_line(exc),
                delay,
            )
            with contextlib.suppress(Exception):
                await queue.claimer.close()
        else:
            logger.error("Queue %s: claiming failed; retrying in %.1fs.", queue.name, delay, exc_info=exc)
        await self._pause(delay)

    # --- executing tasks --------------------------------------------------------------------------

    def _start(self, queue: _Queue, task: ClaimedTask, claimed_at: float) -> None:
        execution = _Execution(queue=queue, task=task, claimed_at=claimed_at)
        runner = asyncio.create_task(self._execute(execution), name=f"absurd task {task['task_id']}")
        self._executions[runner] = execution

    async def _execute(self, execution: _Execution) -> None:
        task, queue = execution.task, execution.queue
        logger.info(
            "task %s name=%s id=%s queue=%s attempt=%s",
            "retry" if task["attempt"] > 1 else "start",
            task["task_name"],
            task["task_id"],
            queue.name,
            _attempt(task),
            extra=_extra(task, queue.name, "started"),
        )
        index = queue.pick_executor()
        queue.running[index] = queue.running.get(index, 0) + 1
        client = queue.executors[index]
        thread = _TaskThread()
        try:
            context = ThreadSensitiveContext(executor=thread) if _CONTEXT_TAKES_EXECUTOR else ThreadSensitiveContext()
            async with context as thread_context:
                try:
                    with Agent.using_thread_executor(thread):
                        ended = await execute_claimed(
                            client, task, self.config.claim_timeout, claimed_at=execution.claimed_at
                        )
                finally:
                    # The task's thread ends with it, so its connections are closed whatever
                    # CONN_MAX_AGE says.
                    if thread.used:
                        await asyncio.get_running_loop().run_in_executor(thread, _close_connections)
                    if not _CONTEXT_TAKES_EXECUTOR and thread_context in SyncToAsync.context_to_thread_executor:
                        await sync_to_async(_close_connections)()
        except asyncio.CancelledError:
            self._log_end(execution, "abandoned", None)
            raise
        except Exception as exc:
            level = logging.WARNING if is_connection_error(exc) else logging.ERROR
            logger.log(
                level,
                "task unrecorded name=%s id=%s queue=%s attempt=%s duration=%.3fs: the database failed while it "
                "ran (%s); it runs again once its lease expires (at most %ds).",
                task["task_name"],
                task["task_id"],
                queue.name,
                _attempt(task),
                time.monotonic() - execution.started,
                _one_line(exc),
                self.config.claim_timeout,
                exc_info=None if is_connection_error(exc) else exc,
                extra=_extra(task, queue.name, "unrecorded"),
            )
        else:
            self._log_end(execution, ended.outcome, ended.error)
        finally:
            thread.shutdown(wait=False)
            queue.running[index] -= 1
            self._executions.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            await self._notify()

    def _log_end(self, execution: _Execution, outcome: str, error: BaseException | None) -> None:
        task, queue = execution.task, execution.queue.name
        duration = time.monotonic() - execution.started
        args: tuple[Any, ...] = (task["task_name"], task["task_id"], queue, _attempt(task), duration)
        extra = _extra(task, queue, outcome, duration)
        common = "name=%s id=%s queue=%s attempt=%s duration=%.3fs"
        if outcome == "completed":
            logger.info("task completed " + common, *args, extra=extra)
        elif outcome == "failed":
            max_attempts = task.get("max_attempts")
            if max_attempts is None or task["attempt"] < max_attempts:
                logger.warning("task failed " + common + ", will be retried: %s", *args, _one_line(error), extra=extra)
            else:
                logger.error(
                    "task failed " + common + ", no attempts left: %s",
                    *args,
                    _one_line(error),
                    exc_info=error,
                    extra=extra,
                )
        elif outcome in ("unknown", "handed back"):
            pass  # execution.py logged why the run went back to the queue, and when it runs again
        elif outcome == "misrouted":
            logger.error("task failed " + common + ": %s", *args, _one_line(error), extra=extra)
        elif outcome == "suspended":
            logger.info("task suspended " + common + " (sleeping or waiting for an event)", *args, extra=extra)
        elif outcome == "cancelled":
            logger.info("task cancelled " + common, *args, extra=extra)
        elif outcome == "lost":
            logger.warning(
                "task lost " + common + ": its run was failed elsewhere (lease expired?)", *args, extra=extra
            )
        else:
            logger.warning("task %s " + common, outcome, *args, extra=extra)

    async def _drain(self) -> None:
        """Wait for in-flight tasks; past the grace deadline, cancel them and put their runs back."""
        assert self._signalled is not None
        if self._executions:
            logger.info("Waiting for %d in-flight task(s) to finish.", len(self._executions))
        while self._executions:
            timeout = None if self._grace_deadline is None else self._grace_deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                await self._abandon()
                return
            waiters: set[asyncio.Future[Any]] = set(self._executions)
            signal_waiter: asyncio.Task[bool] | None = None
            if self._grace_deadline is None:
                # No deadline yet (burst or --max-tasks is ending): a signal sets one.
                signal_waiter = asyncio.create_task(self._signalled.wait())
                waiters.add(signal_waiter)
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if signal_waiter is not None:
                signal_waiter.cancel()

    async def _abandon(self) -> None:
        abandoned = list(self._executions.items())
        logger.warning(
            "Grace period of %gs is over: cancelling %d task(s) and handing them back to the queue.",
            self.config.shutdown_grace,
            len(abandoned),
        )
        for runner, _ in abandoned:
            runner.cancel()
        # A synchronous call (a sync tool) cannot be interrupted, and asgiref waits for it: such a task
        # stays stuck in cancellation. It is handed back all the same and the process exits without it.
        _, stuck = await asyncio.wait([runner for runner, _ in abandoned], timeout=_CANCEL_WAIT)
        for _, execution in abandoned:
            await self._release(execution)
        self._cut_off = len(stuck)
        if stuck:
            logger.warning(
                "%d task(s) were inside a synchronous call: the worker does not wait for them and exits now; "
                "their step in flight was not recorded and runs again in the worker that resumes the task.",
                len(stuck),
            )

    async def _release(self, execution: _Execution) -> None:
        """Make an abandoned run claimable now instead of after its lease; it keeps its attempt number."""
        client = execution.queue.claimer
        try:
            live = await client.live_connection()
            await live.execute(
                "select absurd.schedule_run(%s, %s, absurd.current_time())",
                [execution.queue.name, execution.task["run_id"]],
            )
        except Exception as exc:
            logger.warning(
                "Could not hand task %s back (%s); another worker resumes it when its lease expires.",
                execution.task["task_id"],
                _one_line(exc),
            )

    # --- health -----------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """False when a claim query hangs: the connection is dead in a way the driver cannot see."""
        now = time.monotonic()
        return all(q.claiming_since is None or now - q.claiming_since < _STUCK_CLAIM_SECONDS for q in self._queues)

    async def _heartbeat_loop(self) -> None:
        path = self.config.heartbeat_file
        if not path:
            return
        failing = False
        while True:
            if self.healthy():
                try:
                    await asyncio.to_thread(write_heartbeat, path)
                except OSError as exc:
                    if not failing:
                        logger.warning("Cannot write the heartbeat file %s: %s", path, exc)
                    failing = True
                else:
                    failing = False
            await asyncio.sleep(self.config.poll_interval)

    def _remove_heartbeat(self) -> None:
        if self.config.heartbeat_file:
            with contextlib.suppress(OSError):
                os.unlink(self.config.heartbeat_file)


def exit_now(code: int) -> None:
    """Flush the log and end the process at once, without waiting for threads."""
    for handler in logging.getLogger("django_absurd_agents").handlers + logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(code)


def write_heartbeat(path: str) -> None:
    """Replace the file atomically with the current Unix time, so a probe never reads half a line."""
    target = Path(path)
    scratch = target.with_name(f".{target.name}.{os.getpid()}")
    scratch.write_text(f"{time.time():.3f}\n")
    os.replace(scratch, target)


def heartbeat_age(path: str) -> float | None:
    """Seconds since the worker last wrote ``path``, or None when there is no readable heartbeat."""
    try:
        return time.time() - float(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _attempt(task: ClaimedTask) -> str:
    max_attempts = task.get("max_attempts")
    return f"{task['attempt']}/{max_attempts}" if max_attempts else str(task["attempt"])


def _extra(task: ClaimedTask, queue: str, outcome: str, duration: float | None = None) -> dict[str, Any]:
    """Structured fields for log handlers that want them (never params or results)."""
    return {
        "absurd_task": {
            "name": task["task_name"],
            "id": str(task["task_id"]),
            "run_id": str(task["run_id"]),
            "queue": queue,
            "attempt": task["attempt"],
            "max_attempts": task.get("max_attempts"),
            "outcome": outcome,
            "duration": duration,
        }
    }


def _one_line(exc: BaseException | None) -> str:
    if exc is None:
        return "no error recorded"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
