"""The production worker behind ``manage.py absurd_worker``.

absurd-sdk's own ``start_worker`` claims a batch and waits for the whole batch before claiming again,
has no signal handling, and ends on the first database error. This worker instead:

* keeps ``concurrency`` slots busy: one claimer per queue claims as many tasks as there are free
  slots, and a slot that frees is refilled at once, so one slow agent run never idles the others;
* serves several queues from one process, the slots shared between them;
* stops claiming on SIGTERM/SIGINT and lets in-flight tasks finish within a grace period; a task
  still running after it is put back for another worker at once, and a second signal exits at once;
* survives database restarts: its claims log, back off and reconnect, and running tasks write
  through a connection that is reopened (``reconnect.py``), so nothing is lost or run twice;
* runs each task like Django runs an ASGI request (``task_thread.py``) through ``execution.py``;
* logs one line per task start and end (``worker_log.py``), and writes a heartbeat file for
  orchestrators (``liveness.py``). Its configuration is ``worker_config.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from absurd_sdk import ClaimedTask
from django.utils import timezone

from django_absurd_agents import conf, schedules, worker_record
from django_absurd_agents.client import ProjectAbsurd, absurd
from django_absurd_agents.exceptions import WorkerError
from django_absurd_agents.execution import execute_claimed
from django_absurd_agents.liveness import heartbeat_age, write_heartbeat
from django_absurd_agents.reconnect import is_misconfigured, is_transient
from django_absurd_agents.task_thread import on_task_thread
from django_absurd_agents.wakeup import listen_for_spawns
from django_absurd_agents.worker_config import WorkerConfig, discover_tasks, misconfigured
from django_absurd_agents.worker_log import log_banner, log_end, log_start, log_unrecorded, one_line

__all__ = ["Worker", "WorkerConfig", "WorkerError", "discover_tasks", "heartbeat_age", "write_heartbeat"]

logger = logging.getLogger("django_absurd_agents.worker")

_BACKOFF_FIRST = 0.25
_BACKOFF_CAP = 15.0
# A claim query outstanding this long means the connection hangs (a half-open TCP socket, say):
# the heartbeat file then stops moving so that a liveness probe restarts the process.
_STUCK_CLAIM_SECONDS = 60.0
# How long cancelled tasks get to unwind at the end of the grace period.
_CANCEL_WAIT = 0.5


@dataclass
class _Queue:
    name: str
    claimer: ProjectAbsurd
    executors: list[ProjectAbsurd]
    running: dict[int, int] = field(default_factory=dict)
    failures: int = 0
    claiming_since: float | None = None
    idle_generation: int = -1
    spawned: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a spawn on this queue is notified (wakeup.py): the idle claimer claims at once."""

    def pick_executor(self) -> int:
        """The least busy execution client; among equals one already connected, so idle ones stay closed."""

        def load(index: int) -> tuple[int, bool]:
            return self.running.get(index, 0), not self.executors[index].connected

        return min(range(len(self.executors)), key=load)


@dataclass
class _Execution:
    queue: _Queue
    task: ClaimedTask
    claimed_at: float
    started: float = field(default_factory=time.monotonic)

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started


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
        self._done = 0
        self._last_error = ""
        self._started_at = timezone.now()

    def _free_slots(self) -> int:
        free = self.config.concurrency - len(self._executions) - self._reserved
        if self.config.max_tasks is not None:
            free = min(free, self.config.max_tasks - self._claimed - self._reserved)
        return max(free, 0)

    def _exhausted(self) -> bool:
        return self.config.max_tasks is not None and self._claimed >= self.config.max_tasks

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

    async def run(self, *, handle_signals: bool = True) -> int:
        self._changed = asyncio.Condition()
        self._stop_event = asyncio.Event()
        self._signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
        self._queues = [self._make_queue(name) for name in self.config.queues]
        background: list[asyncio.Task[None]] = []
        try:
            if not await self._wait_for_database():
                return 0
            log_banner(self.config, self.app.registry)
            background = self._start_background()
            await asyncio.gather(*(self._claim_loop(queue) for queue in self._queues))
            if self._exhausted() and not self._stopping:
                logger.info("Claimed the %d task(s) of --max-tasks; finishing them.", self._claimed)
            await self._drain()
            logger.info("Worker %s stopped after %d task(s).", self.config.worker_id, self._claimed)
            return 0
        finally:
            await self._close(background)
            if handle_signals:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)

    def _start_background(self) -> list[asyncio.Task[None]]:
        """The liveness file, the worker table's row, the LISTEN for spawns, and the scheduler if asked."""
        assert self._stop_event is not None
        by_name = {queue.name: queue for queue in self._queues}
        jobs = [
            self._heartbeat_loop(),
            self._record_loop(),
            listen_for_spawns(self.config.queues, lambda queue: by_name[queue].spawned.set()),
        ]
        if self.config.schedule:
            jobs.append(schedules.run_scheduler(self.app, self._stop_event))
        return [asyncio.create_task(job) for job in jobs]

    async def _close(self, background: list[asyncio.Task[None]]) -> None:
        for job in background:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
        self._remove_heartbeat()
        if background:
            await self._leave()
        for queue in self._queues:
            for client in (queue.claimer, *queue.executors):
                with contextlib.suppress(Exception):
                    await client.close()
        if self._cut_off:
            # Returning would wait for those calls: asyncio.run() and the interpreter join them.
            exit_now(0)

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
                if not is_transient(exc):
                    raise
                failures += 1
                delay = self._backoff(failures)
                logger.warning("Database unreachable (%s); retrying in %.1fs.", one_line(exc), delay)
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
            queue.spawned.clear()  # a spawn notified from now on wakes the next idle wait
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
                await self._idle(queue)

    async def _idle(self, queue: _Queue) -> None:
        """Wait for the next poll, a spawn on this queue, or a stop, whichever comes first."""
        assert self._stop_event is not None
        waiters = [asyncio.ensure_future(self._stop_event.wait()), asyncio.ensure_future(queue.spawned.wait())]
        try:
            await asyncio.wait(waiters, timeout=self.config.poll_interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _claim_failed(self, queue: _Queue, exc: Exception) -> None:
        if is_misconfigured(exc):
            raise misconfigured(exc) from exc
        queue.failures += 1
        delay = self._backoff(queue.failures)
        if is_transient(exc):
            logger.warning(
                "Queue %s: cannot claim, the database connection failed (%s); reconnecting in %.1fs.",
                queue.name,
                one_line(exc),
                delay,
            )
            with contextlib.suppress(Exception):
                await queue.claimer.close()
        else:
            logger.error("Queue %s: claiming failed; retrying in %.1fs.", queue.name, delay, exc_info=exc)
        await self._pause(delay)

    def _start(self, queue: _Queue, task: ClaimedTask, claimed_at: float) -> None:
        execution = _Execution(queue=queue, task=task, claimed_at=claimed_at)
        runner = asyncio.create_task(self._execute(execution), name=f"absurd task {task['task_id']}")
        self._executions[runner] = execution

    async def _execute(self, execution: _Execution) -> None:
        task, queue = execution.task, execution.queue
        log_start(task, queue.name)
        index = queue.pick_executor()
        queue.running[index] = queue.running.get(index, 0) + 1
        client = queue.executors[index]
        try:
            ended = await on_task_thread(
                lambda: execute_claimed(client, task, self.config.claim_timeout, claimed_at=execution.claimed_at)
            )
        except asyncio.CancelledError:
            log_end(task, queue.name, "abandoned", None, execution.duration)
            raise
        except Exception as exc:
            log_unrecorded(task, queue.name, exc, execution.duration, self.config.claim_timeout)
        else:
            log_end(task, queue.name, ended.outcome, ended.error, execution.duration)
            if ended.error is not None:
                self._last_error = f"{task['task_name']} {task['task_id']}: {one_line(ended.error)}"
        finally:
            self._done += 1
            queue.running[index] -= 1
            self._executions.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            await self._notify()

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
                one_line(exc),
            )

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

    async def _record_loop(self) -> None:
        """Keep this worker's row in the worker table fresh (``worker_record.py``)."""
        interval = conf.get().worker_heartbeat
        failing = False
        while True:
            report = {
                "worker_id": self.config.worker_id,
                "pid": os.getpid(),
                "queues": self.config.queues,
                "concurrency": self.config.concurrency,
                "interval": interval,
                "started": self._started_at,
                "in_flight": len(self._executions),
                "done": self._done,
                "last_error": self._last_error,
            }
            try:
                await worker_record.beat(await self._queues[0].claimer.live_connection(), report)
            except Exception as exc:  # the claim loop reports database trouble; this only retries
                if not failing:
                    logger.warning("Cannot record this worker in the worker table: %s", one_line(exc))
                failing = True
            else:
                failing = False
            await asyncio.sleep(interval)

    async def _leave(self) -> None:
        with contextlib.suppress(Exception):
            await worker_record.leave(await self._queues[0].claimer.live_connection(), self.config.worker_id)

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
