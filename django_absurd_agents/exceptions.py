"""Every exception the app raises on purpose, under one base class: ``except AbsurdAgentsError`` catches them all.

Each also derives from the built-in exception that callers caught before it had a base of its own
(``TaskNotFound`` is still a ``LookupError``, ``InvalidParams`` a ``ValueError``), and each message
names the fix. The modules that raise them import them from here; the old import paths
(``django_absurd_agents.validation.TaskNotFound``, ...) keep working.
"""

from __future__ import annotations


class AbsurdAgentsError(Exception):
    """The base class of every exception of django-absurd-agents."""


class TaskNotFound(AbsurdAgentsError, LookupError):
    """No task has this id (in the given queue, or in any queue); nothing was changed."""


class UnknownQueue(AbsurdAgentsError, ValueError):
    """A call naming a queue that does not exist in the database; nothing was written."""


class InvalidParams(AbsurdAgentsError, ValueError):
    """Task params, an event payload or a spawn argument that cannot be stored; nothing was written."""


class UnstorableJSON(AbsurdAgentsError, ValueError):
    """Valid JSON text (or nearly: NaN, Infinity) that PostgreSQL's jsonb cannot store."""


class TransactionNotCommitted(AbsurdAgentsError, RuntimeError):
    """A testing helper was asked to run tasks that the test's own open transaction hides from it."""


class UnrecordableStepResult(AbsurdAgentsError, TypeError):
    """A step's result cannot be written to its checkpoint; the message names the step (and so the tool).

    The step's body has run, so the task is failed without another attempt: a retry would run the
    body (a side-effecting tool, a paid model request) again only to fail the same way. Fix the code,
    then retry the task: it resumes after the last recorded step.
    """


class UnrecordableTaskResult(AbsurdAgentsError, ValueError):
    """A task returned a value that cannot be stored as JSON."""


class UnknownTask(AbsurdAgentsError):
    """A claimed task whose name no handler is registered for in this worker."""


class SwallowedSuspension(AbsurdAgentsError):
    """The handler went on after absurd-sdk suspended its task (a sleep or an event wait)."""


class WorkerError(AbsurdAgentsError):
    """A configuration problem that keeps the worker from starting; the message names the fix."""


class ScheduleError(AbsurdAgentsError, ValueError):
    """A schedule in settings that cannot run; the message names it and the fix."""


class CorruptHistory(AbsurdAgentsError, ValueError):
    """Stored entries that do not load as Pydantic AI messages (edited by hand, or by another version)."""


class UnknownChatAgent(AbsurdAgentsError, LookupError):
    """A turn names a chat agent this worker has not registered."""


class StaleConversation(AbsurdAgentsError, RuntimeError):
    """The conversation was saved by something other than its turns while a turn ran."""


class TurnTimeout(AbsurdAgentsError, TimeoutError):
    """A turn did not finish within the time a caller was willing to wait."""


class TurnFailed(AbsurdAgentsError):
    """The turn's task ended without an answer; the chat stream ends with an error chunk saying so."""


class SchemaVersionError(AbsurdAgentsError, RuntimeError):
    """The database holds an Absurd schema this version cannot use (newer, or not Absurd's)."""


class QueueStorageError(AbsurdAgentsError, RuntimeError):
    """A queue declared with a storage mode the database does not have it in; nothing was changed."""

    def __init__(self, queue: str, declared: str, stored: str) -> None:
        super().__init__(
            f"Queue {queue!r} is stored {stored} in the database, but ABSURD_AGENTS['QUEUES'] declares it "
            f"{declared}. Absurd cannot change the storage of an existing queue."
        )
        self.hint = (
            f'Declare it as "storage": "{stored}" again, or give the {declared} queue a new name (e.g. '
            f"'{queue}_{declared[:4]}'), route new tasks there (DEFAULT_QUEUE, TASK_ROUTES) and run migrate; "
            "once the old queue's tasks are finished, remove it from QUEUES and drop it "
            f"(select absurd.drop_queue('{queue}'))."
        )


class EmbeddedPostgresError(AbsurdAgentsError, RuntimeError):
    """The embedded server is missing, cannot be started or cannot be reached."""
