"""The Absurd admin: every page, filter, action and permission, on real tasks in a real Postgres."""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.contrib.auth.models import Group, Permission, User
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from django_absurd_agents import absurd, steps, tables, task_list, task_records
from django_absurd_agents.admin import AbsurdTaskAdmin, task_admin
from django_absurd_agents.json_text import pretty_json
from django_absurd_agents.models import AbsurdTask
from django_absurd_agents.templatetags.absurd_admin import absurd_duration as format_duration
from tests import agents

SECRET = "patient-record-4711"
"""Text placed in params: it must never reach a user without the view permission."""


@absurd.register_task(name="admin_fails")
async def admin_fails(params: dict[str, Any], ctx: Any) -> None:
    raise ValueError(f"bad input: {params['n']}")


@absurd.register_task(name="admin_waits")
async def admin_waits(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    payload = await ctx.await_event(f"approval:{ctx.task_id}")
    return {"approved": payload}


@absurd.register_task(name="admin_retrier")
async def admin_retrier(params: dict[str, Any], ctx: Any) -> str:
    result = await agents.retrier.run("flaky please")
    return str(result.output)


# --- helpers --------------------------------------------------------------------------------------


def url(name: str, **kwargs: Any) -> str:
    return reverse(f"admin:absurd_agents_absurdtask_{name}", kwargs=kwargs or None)


def task_url(queue: str, task_id: str, action: str = "detail") -> str:
    return url(action, queue=queue, task_id=task_id)


def make_user(username: str, *perms: str, staff: bool = True) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=staff)
    for perm in perms:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label="absurd_agents", codename=perm.split(".")[-1])
        )
    return user


def client_for(user: User | None, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    if user is not None:
        client.force_login(user)
    return client


def task_row(task_id: str, queue: str = "agents") -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"select state, attempts, max_attempts, task_name from absurd.t_{queue} where task_id = %s", [task_id]
        )
        row = cursor.fetchone()
    assert row is not None, f"task {task_id} is gone"
    return {"state": row[0], "attempts": row[1], "max_attempts": row[2], "task_name": row[3]}


def fail_by_claim_timeout(task_id: str, queue: str = "agents") -> None:
    """Claim ``task_id`` for a worker that then "dies": its lease expires and the next claim sweeps it.

    The clock is moved with ``absurd.fake_now``; the caller must leave no other task claimable.
    """
    with connection.cursor() as cursor:
        cursor.execute("select task_id from absurd.claim_task(%s, 'doomed-worker', 1, 1)", [queue])
        assert str(cursor.fetchone()[0]) == task_id
        cursor.execute("select set_config('absurd.fake_now', (clock_timestamp() + interval '1 minute')::text, false)")
        try:
            cursor.execute("select count(*) from absurd.claim_task(%s, 'sweeper', 1, 1)", [queue])
        finally:
            cursor.execute("select set_config('absurd.fake_now', '', false)")


def run_worker(batches: int = 1, queue: str = "agents") -> None:
    """Work the queue in this process, the way ``absurd_worker`` does, on the client's own connection."""

    async def work() -> None:
        client = absurd.for_queue(queue)
        try:
            for _ in range(batches):
                await client.work_batch(worker_id="admin-test-worker", claim_timeout=10, batch_size=10)
        finally:
            await client.close()

    async_to_sync(work)()


def log_entries(task_id: str) -> list[LogEntry]:
    return list(LogEntry.objects.filter(object_id=task_id).order_by("pk"))


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def viewer(db: Any) -> User:
    return make_user("viewer", "view_absurdtask")


@pytest.fixture
def operator(db: Any) -> User:
    return make_user("operator", "view_absurdtask", "retry_absurdtask", "cancel_absurdtask", "emit_absurdevent")


@pytest.fixture
def nobody(db: Any) -> User:
    return make_user("nobody")


@pytest.fixture
def pending_task(db: Any) -> str:
    return absurd.spawn_sync("analyse", {"prompt": f"Summarise {SECRET}"})["task_id"]


@pytest.fixture
def failed_task(db: Any) -> str:
    task_id = absurd.spawn_sync("analyse", {"prompt": f"crash {SECRET}"}, max_attempts=1)["task_id"]
    fail_by_claim_timeout(task_id)
    assert task_row(task_id)["state"] == "failed"
    return task_id


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(AbsurdTaskAdmin, "list_per_page", 3)
    yield


# --- permissions ----------------------------------------------------------------------------------


def all_urls(queue: str, task_id: str) -> list[str]:
    return [
        url("changelist"),
        url("overview"),
        url("emit"),
        task_url(queue, task_id),
        task_url(queue, task_id, "retry"),
        task_url(queue, task_id, "cancel"),
        task_url(queue, task_id, "emit_task"),
        url("change", object_id=task_id),
    ]


@pytest.mark.django_db
def test_staff_without_permissions_gets_403_and_no_data(nobody: User, failed_task: str) -> None:
    client = client_for(nobody)
    form = {"mode": "in_place", "extra_attempts": "1", "queue": "agents", "event_name": "x"}
    for address in all_urls("agents", failed_task):
        for method in (client.get, client.post):
            response = method(address, form)
            assert response.status_code == 403, (address, response.status_code)
            assert SECRET not in response.content.decode()
    assert task_row(failed_task)["state"] == "failed"
    assert not LogEntry.objects.exists()


@pytest.mark.django_db
def test_admin_index_hides_the_entry_from_staff_without_permissions(nobody: User, viewer: User) -> None:
    assert url("changelist") not in client_for(nobody).get(reverse("admin:index")).content.decode()
    index = client_for(viewer).get(reverse("admin:index")).content.decode()
    assert url("changelist") in index
    assert "Absurd tasks" in index


@pytest.mark.django_db
def test_anonymous_and_non_staff_users_are_sent_to_login(pending_task: str) -> None:
    outsider = make_user("outsider", "view_absurdtask", staff=False)
    for client in (Client(), client_for(outsider)):
        for address in all_urls("agents", pending_task):
            response = client.get(address)
            assert response.status_code == 302, address
            assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.django_db
def test_viewer_reads_every_page_but_may_not_act(viewer: User, failed_task: str) -> None:
    client = client_for(viewer)
    for address in (url("changelist"), url("overview"), task_url("agents", failed_task)):
        assert client.get(address).status_code == 200, address
    detail = client.get(task_url("agents", failed_task)).content.decode()
    assert SECRET in detail
    assert task_url("agents", failed_task, "retry") not in detail  # no buttons without the permissions
    for action in ("retry", "cancel", "emit_task"):
        assert client.get(task_url("agents", failed_task, action)).status_code == 403
        assert (
            client.post(task_url("agents", failed_task, action), {"mode": "in_place", "extra_attempts": 1}).status_code
            == 403
        )
    assert client.post(url("emit"), {"queue": "agents", "event_name": "x", "payload": "{}"}).status_code == 403
    assert task_row(failed_task)["state"] == "failed"


@pytest.mark.django_db
def test_each_action_needs_its_own_permission(failed_task: str, pending_task: str) -> None:
    retrier = client_for(make_user("retrier", "view_absurdtask", "retry_absurdtask"))
    assert retrier.get(task_url("agents", failed_task, "retry")).status_code == 200
    assert retrier.get(task_url("agents", pending_task, "cancel")).status_code == 403
    assert retrier.get(url("emit")).status_code == 403
    # An action permission without the view permission shows nothing either.
    blind = client_for(make_user("blind", "retry_absurdtask", "cancel_absurdtask", "emit_absurdevent"))
    assert blind.get(task_url("agents", failed_task, "retry")).status_code == 403
    assert blind.get(url("emit")).status_code == 403


@pytest.mark.django_db
def test_view_permission_granted_through_a_group(pending_task: str) -> None:
    group = Group.objects.create(name="support")
    group.permissions.add(Permission.objects.get(content_type__app_label="absurd_agents", codename="view_absurdtask"))
    member = make_user("member")
    member.groups.add(group)
    assert client_for(member).get(task_url("agents", pending_task)).status_code == 200


# --- task list ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_list_shows_tasks_of_every_queue_with_their_columns(viewer: User, failed_task: str) -> None:
    other = absurd.spawn_sync("digest", {"day": "monday"}, queue="other")["task_id"]
    page = client_for(viewer).get(url("changelist")).content.decode()
    assert failed_task in page and other in page
    assert task_url("agents", failed_task) in page
    assert task_url("other", other) in page
    for text in ("analyse", "digest", "1 / 1", "failed", "pending", "2 tasks."):
        assert text in page, text
    # newest first
    assert page.index(other) < page.index(failed_task)


@pytest.mark.django_db
def test_list_filters_by_queue_state_name_and_date(viewer: User, failed_task: str, pending_task: str) -> None:
    other = absurd.spawn_sync("digest", {"day": "monday"}, queue="other")["task_id"]
    client = client_for(viewer)

    def shown(**query: str) -> set[str]:
        page = client.get(url("changelist"), query).content.decode()
        return {t for t in (failed_task, pending_task, other) if t in page}

    assert shown() == {failed_task, pending_task, other}
    assert shown(queue="other") == {other}
    assert shown(queue="agents") == {failed_task, pending_task}
    assert shown(state="failed") == {failed_task}
    assert shown(state="pending") == {pending_task, other}
    assert shown(state="nonsense") == {failed_task, pending_task, other}
    assert shown(task_name="digest") == {other}
    assert shown(task_name="digest", queue="agents") == set()
    assert shown(created="hour") == {failed_task, pending_task, other}
    assert shown(created="today") == {failed_task, pending_task, other}
    tomorrow = (datetime.date.today() + datetime.timedelta(days=2)).isoformat()
    long_ago = "2001-01-01"
    assert shown(created_since=tomorrow) == set()
    assert shown(created_since=long_ago, created_until=tomorrow) == {failed_task, pending_task, other}
    assert shown(created_until=long_ago) == set()
    page = client.get(url("changelist"), {"state": "failed"}).content.decode()
    assert "1 task matches." in page and "Clear all filters" in page


@pytest.mark.django_db
def test_task_name_choices_come_from_tables_and_registry(viewer: User, pending_task: str) -> None:
    absurd.spawn_sync("digest", {}, queue="other")
    page = client_for(viewer).get(url("changelist")).content.decode()
    for name in ("analyse", "digest", "admin_waits"):  # admin_waits: registered, never spawned
        assert f"?task_name={name}" in page, name


@pytest.mark.django_db
def test_list_search_by_task_id_and_by_text_in_params(viewer: User, pending_task: str) -> None:
    percent = absurd.spawn_sync("analyse", {"prompt": "growth of 100% in q3_results"})["task_id"]
    client = client_for(viewer)

    def shown(q: str) -> set[str]:
        page = client.get(url("changelist"), {"q": q}).content.decode()
        return {t for t in (pending_task, percent) if t in page}

    assert shown(pending_task) == {pending_task}
    assert shown(pending_task.upper()) == {pending_task}
    assert shown(SECRET) == {pending_task}
    assert shown(SECRET.upper()) == {pending_task}  # case-insensitive
    assert shown("100%") == {percent}
    assert shown("q3_r") == {percent}
    assert shown("%") == {percent}  # a literal percent sign, not a wildcard
    assert shown("_") == {percent}
    assert shown(str(uuid.uuid4())) == set()
    assert shown("no such words") == set()
    page = client.get(url("changelist"), {"q": SECRET}).content.decode()
    assert "Searching the params reads every task" in page and "task matches" not in page
    assert "1 task matches." in client.get(url("changelist"), {"q": pending_task}).content.decode()


@pytest.mark.django_db
def test_keyset_pagination_walks_forward_and_back(viewer: User, small_pages: None) -> None:
    spawned = [
        absurd.spawn_sync("analyse" if n % 2 else "digest", {"n": n}, queue="agents" if n % 2 else "other")["task_id"]
        for n in range(8)
    ]
    # Ids are UUIDv7: spawn order to the millisecond, in no particular order within one.
    newest_first = sorted(spawned, key=uuid.UUID, reverse=True)
    assert newest_first[0][:13] >= spawned[-1][:13] and newest_first[-1][:13] <= spawned[0][:13]
    client = client_for(viewer)
    response = client.get(url("changelist"))
    pages: list[list[str]] = []
    while True:
        page = response.context["page"]
        pages.append([row.task_id for row in page.rows])
        if not response.context["next_url"]:
            break
        response = client.get(url("changelist") + response.context["next_url"])
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:8]]
    assert "Older" not in response.content.decode()
    # and back
    back = client.get(url("changelist") + response.context["previous_url"])
    assert [row.task_id for row in back.context["page"].rows] == newest_first[3:6]
    back = client.get(url("changelist") + back.context["previous_url"])
    assert [row.task_id for row in back.context["page"].rows] == newest_first[0:3]
    assert back.context["previous_url"] is None
    # filters stay applied while paging
    filtered = client.get(url("changelist"), {"queue": "agents"})
    following = client.get(url("changelist") + filtered.context["next_url"])
    assert [row.task_id for row in following.context["page"].rows] == [t for t in newest_first if t in spawned[1::2]][
        3:
    ]


@pytest.mark.django_db
def test_totals_are_exact_when_small_and_estimated_when_large(viewer: User, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(5):
        absurd.spawn_sync("analyse", {"n": n})
    client = client_for(viewer)
    assert "5 tasks." in client.get(url("changelist")).content.decode()
    monkeypatch.setattr(task_list, "COUNT_CAP", 3)
    monkeypatch.setattr(task_list, "EXACT_TOTAL_ROWS", 4)
    with connection.cursor() as cursor:
        cursor.execute("analyze absurd.t_agents")
        cursor.execute("analyze absurd.t_other")
    page = client.get(url("changelist")).content.decode()
    assert "About 5 tasks (the planner's estimate" in page
    page = client.get(url("changelist"), {"state": "pending"}).content.decode()
    assert "More than 3 matching tasks." in page


# --- queues come and go ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_queue_added_and_dropped_while_the_site_runs(viewer: User, pending_task: str) -> None:
    client = client_for(viewer)
    with connection.cursor() as cursor:
        cursor.execute("select absurd.create_queue('late_queue')")
    late = absurd.spawn_sync("late_job", {"when": "now"}, queue="late_queue")["task_id"]
    page = client.get(url("changelist")).content.decode()
    assert late in page and pending_task in page
    assert "?queue=late_queue" in page
    assert client.get(task_url("late_queue", late)).status_code == 200
    assert "late_queue" in client.get(url("overview")).content.decode()

    with connection.cursor() as cursor:
        cursor.execute("select absurd.drop_queue('late_queue')")
    page = client.get(url("changelist")).content.decode()
    assert pending_task in page and late not in page
    page = client.get(url("changelist"), {"queue": "late_queue"}).content.decode()
    assert "There is no queue “late_queue”" in page
    assert client.get(task_url("late_queue", late)).status_code == 404
    assert client.get(url("overview")).status_code == 200


@pytest.mark.django_db
def test_queue_dropped_between_catalog_read_and_table_read(
    viewer: User, pending_task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale queue list (the queue was dropped right after it was read) is retried, not shown as an error."""
    real = tables.queue_catalog
    calls = {"n": 0}

    def stale_then_fresh() -> list[tuple[str, bool]]:
        calls["n"] += 1
        return [*real(), ("dropped_meanwhile", True)] if calls["n"] == 1 else real()

    monkeypatch.setattr(tables, "queue_catalog", stale_then_fresh)
    monkeypatch.setattr(task_admin, "queue_catalog", stale_then_fresh)  # the page reads it once, by this name
    response = client_for(viewer).get(url("changelist"))
    assert response.status_code == 200
    assert pending_task in response.content.decode()
    assert calls["n"] >= 2


def catalog_reads(queries: list[dict[str, Any]]) -> int:
    return sum(tables.CATALOG_SQL in query["sql"] for query in queries)


@pytest.mark.django_db
@pytest.mark.parametrize("query", [{}, {"queue": "agents", "task_name": "analyse"}, {"queue": "no_such_queue"}])
def test_the_task_list_reads_the_queue_catalog_once_per_page(
    viewer: User, pending_task: str, query: dict[str, str]
) -> None:
    """The page, its total, its filter choices and its warnings share one reading of absurd.queues."""
    client = client_for(viewer)
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url("changelist"), query)
    assert response.status_code == 200
    assert (pending_task in response.content.decode()) is (query.get("queue") != "no_such_queue")
    assert catalog_reads(captured.captured_queries) == 1


@pytest.mark.django_db
def test_no_schema_or_no_queues_is_explained(viewer: User) -> None:
    with connection.cursor() as cursor:
        cursor.execute("select queue_name from absurd.queues")
        for (queue,) in cursor.fetchall():
            cursor.execute("select absurd.drop_queue(%s)", [queue])
    client = client_for(viewer)
    assert "There are no Absurd queues" in client.get(url("changelist")).content.decode()
    assert "There are no Absurd queues" in client.get(url("overview")).content.decode()


# --- task detail ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_detail_shows_params_options_runs_and_claim_timeout(viewer: User, failed_task: str) -> None:
    response = client_for(viewer).get(task_url("agents", failed_task))
    page = response.content.decode()
    assert SECRET in page
    assert "$ClaimTimeout" in page
    assert "worker did not finish task within claim interval" in page
    assert "doomed-worker" in page
    assert "exponential" in page  # the default retry strategy
    detail = response.context["task"]
    assert detail.state == "failed" and len(detail.runs) == 1
    assert detail.runs[0].is_claim_timeout and detail.runs[0].claimed_by == "doomed-worker"


@pytest.mark.django_db
def test_detail_shows_headers_cancellation_and_idempotency_key(viewer: User) -> None:
    task_id = absurd.spawn_sync(
        "analyse",
        {"prompt": "x"},
        headers={"trace": "abc-123"},
        cancellation={"max_duration": 600},
        idempotency_key="order-77",
    )["task_id"]
    page = client_for(viewer).get(task_url("agents", task_id)).content.decode()
    for text in ("abc-123", "max_duration", "order-77", "No checkpoints yet."):
        assert text in page, text


@pytest.mark.django_db
def test_detail_of_unknown_task_or_queue_is_404(viewer: User, pending_task: str) -> None:
    client = client_for(viewer)
    assert client.get(task_url("agents", str(uuid.uuid4()))).status_code == 404
    assert client.get(task_url("nowhere", pending_task)).status_code == 404
    assert client.get(task_url("other", pending_task)).status_code == 404
    assert client.get(url("changelist") + "agents/not-a-uuid/").status_code == 404


@pytest.mark.django_db
def test_admin_log_link_finds_the_task_in_its_queue(viewer: User) -> None:
    task_id = absurd.spawn_sync("digest", {}, queue="other")["task_id"]
    client = client_for(viewer)
    response = client.get(url("change", object_id=task_id))
    assert response.status_code == 302 and response["Location"] == task_url("other", task_id)
    assert client.get(url("change", object_id=str(uuid.uuid4()))).status_code == 404
    assert client.get(url("change", object_id="garbage")).status_code == 404


# --- overview -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_overview_counts_per_queue_and_state(viewer: User, failed_task: str, pending_task: str) -> None:
    absurd.spawn_sync("digest", {}, queue="other")
    absurd.spawn_sync("digest", {}, queue="other")
    response = client_for(viewer).get(url("overview"))
    by_queue = {item["queue"].queue: item["queue"] for item in response.context["items"]}
    assert by_queue["agents"].counts == {"failed": 1, "pending": 1}
    assert by_queue["other"].counts == {"pending": 2}
    assert by_queue["agents"].failed_runs_last_hour == 1
    assert by_queue["agents"].tasks_failed_last_hour == 1
    assert by_queue["other"].failed_runs_last_hour == 0
    assert by_queue["agents"].oldest_pending_age is not None
    page = response.content.decode()
    assert "1 task failed for good" in page
    assert url("changelist") + "?queue=agents&amp;state=failed" in page


@pytest.mark.django_db
def test_overview_is_linked_from_the_task_list_and_the_admin_index(viewer: User) -> None:
    client = client_for(viewer)
    assert url("overview") in client.get(url("changelist")).content.decode()
    from django_absurd_agents import models

    if not hasattr(models, "AbsurdOverview"):
        pytest.skip("the admin-index entry needs the AbsurdOverview proxy model in models.py")
    index = client.get(reverse("admin:index")).content.decode()
    overview_entry = reverse("admin:absurd_agents_absurdoverview_changelist")
    assert overview_entry in index
    assert "Absurd overview" in client.get(overview_entry).content.decode()
    assert client_for(make_user("nobody2")).get(overview_entry).status_code == 403


# --- actions --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_retry_in_place_after_confirmation(operator: User, failed_task: str) -> None:
    client = client_for(operator)
    confirm = client.get(task_url("agents", failed_task, "retry"))
    assert confirm.status_code == 200
    assert "csrfmiddlewaretoken" in confirm.content.decode()
    assert task_row(failed_task)["state"] == "failed"  # GET changes nothing

    response = client.post(task_url("agents", failed_task, "retry"), {"mode": "in_place", "extra_attempts": 2})
    assert response.status_code == 302 and response["Location"] == task_url("agents", failed_task)
    assert task_row(failed_task) == {"state": "pending", "attempts": 2, "max_attempts": 3, "task_name": "analyse"}
    [entry] = log_entries(failed_task)
    assert entry.user == operator and entry.action_flag == CHANGE
    assert entry.content_type == ContentType.objects.get_for_model(AbsurdTask)
    assert entry.object_repr == f"analyse {failed_task}"
    assert "Retried in place" in entry.get_change_message()
    page = client.get(response["Location"]).content.decode()
    assert "will run again (attempt 2)" in page


@pytest.mark.django_db
def test_retry_as_a_new_task(operator: User, failed_task: str) -> None:
    client = client_for(operator)
    response = client.post(task_url("agents", failed_task, "retry"), {"mode": "new", "extra_attempts": 4})
    assert response.status_code == 302
    new_id = response["Location"].rstrip("/").split("/")[-1]
    assert new_id != failed_task
    assert task_row(new_id) == {"state": "pending", "attempts": 1, "max_attempts": 4, "task_name": "analyse"}
    assert task_row(failed_task)["state"] == "failed"
    assert [e.action_flag for e in log_entries(failed_task)] == [CHANGE]
    assert [e.action_flag for e in log_entries(new_id)] == [ADDITION]
    assert SECRET in client.get(response["Location"]).content.decode()  # same params


@pytest.mark.django_db
def test_retry_refuses_a_task_that_has_not_failed_and_bad_input(
    operator: User, failed_task: str, pending_task: str
) -> None:
    client = client_for(operator)
    response = client.post(
        task_url("agents", pending_task, "retry"), {"mode": "in_place", "extra_attempts": 1}, follow=True
    )
    assert "Only a failed task can be retried; this one is pending." in response.content.decode()
    assert task_row(pending_task)["state"] == "pending"
    response = client.post(task_url("agents", failed_task, "retry"), {"mode": "in_place", "extra_attempts": 0})
    assert response.status_code == 200 and response.context["form"].errors
    assert task_row(failed_task)["state"] == "failed"
    assert not LogEntry.objects.exists()


@pytest.mark.django_db
def test_cancel_after_confirmation(operator: User, pending_task: str) -> None:
    client = client_for(operator)
    assert client.get(task_url("agents", pending_task, "cancel")).status_code == 200
    assert task_row(pending_task)["state"] == "pending"
    response = client.post(task_url("agents", pending_task, "cancel"))
    assert response.status_code == 302
    assert task_row(pending_task)["state"] == "cancelled"
    [entry] = log_entries(pending_task)
    assert entry.get_change_message() == "Cancelled (was pending)."
    response = client.post(task_url("agents", pending_task, "cancel"), follow=True)
    assert "this one is cancelled" in response.content.decode()
    assert len(log_entries(pending_task)) == 1


@pytest.mark.django_db
def test_actions_are_csrf_protected(operator: User, failed_task: str, pending_task: str) -> None:
    client = client_for(operator, enforce_csrf_checks=True)
    assert (
        client.post(task_url("agents", failed_task, "retry"), {"mode": "in_place", "extra_attempts": 1}).status_code
        == 403
    )
    assert client.post(task_url("agents", pending_task, "cancel")).status_code == 403
    assert client.post(url("emit"), {"queue": "agents", "event_name": "e", "payload": "1"}).status_code == 403
    assert task_row(failed_task)["state"] == "failed"
    assert task_row(pending_task)["state"] == "pending"
    # with the token from the confirmation page it goes through
    page = client.get(task_url("agents", pending_task, "cancel"))
    token = page.context["csrf_token"]
    response = client.post(task_url("agents", pending_task, "cancel"), {"csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert task_row(pending_task)["state"] == "cancelled"


@pytest.mark.django_db
def test_emit_an_event_from_the_global_page(operator: User) -> None:
    client = client_for(operator)
    page = client.get(url("emit"))
    assert page.status_code == 200 and '<option value="other">' in page.content.decode()
    response = client.post(url("emit"), {"queue": "other", "event_name": "deploy:42", "payload": '{"ok": true}'})
    assert response.status_code == 302
    event = task_records.event("other", "deploy:42")
    assert event is not None and event.emitted and event.payload == {"ok": True}
    [entry] = LogEntry.objects.all()
    assert entry.object_id is None and entry.object_repr == "event deploy:42 on other"
    # A second emit of the same name is ignored by Absurd, and the admin says so.
    response = client.post(
        url("emit"), {"queue": "other", "event_name": "deploy:42", "payload": '{"ok": false}'}, follow=True
    )
    assert "was ignored (the first emit wins)" in response.content.decode()
    assert task_records.event("other", "deploy:42").payload == {"ok": True}  # type: ignore[union-attr]


@pytest.mark.django_db
def test_emit_rejects_bad_json_and_unknown_queues(operator: User) -> None:
    client = client_for(operator)
    response = client.post(url("emit"), {"queue": "agents", "event_name": "e", "payload": "{nope"})
    assert response.status_code == 200 and "This is not JSON" in response.content.decode()
    response = client.post(url("emit"), {"queue": "gone", "event_name": "e", "payload": "1"})
    assert response.status_code == 200 and "queue" in response.context["form"].errors
    response = client.post(url("emit"), {"queue": "agents", "event_name": "   ", "payload": "1"})
    assert "event_name" in response.context["form"].errors
    assert task_records.event("agents", "e") is None
    assert not LogEntry.objects.exists()


# --- with a worker: real agent checkpoints, real failures, real waits -----------------------------


@pytest.mark.django_db(transaction=True)
def test_agent_steps_are_rendered_for_people(clean_queues: None) -> None:
    viewer = make_user("viewer", "view_absurdtask")
    task_id = absurd.spawn_sync("analyse", {"prompt": "How is ACME?"})["task_id"]
    run_worker()
    assert task_row(task_id)["state"] == "completed"
    response = client_for(viewer).get(task_url("agents", task_id))
    page = response.content.decode()
    rendered = response.context["steps"]
    assert [(s.kind, s.title) for s in rendered] == [
        ("model", "Model request 1"),
        ("tool", "Tool quote"),
        ("model", "Model request 2"),
        ("tool", "Tool stamp"),
        ("model", "Model request 3"),
    ]
    quote = rendered[1]
    assert quote.call is not None and quote.call.args == {"symbol": "ACME"}
    assert quote.result == {"symbol": "ACME", "price": 12.5}
    assert rendered[0].tool_calls[0].tool_name == "quote"
    assert rendered[4].texts[0].startswith("done: quote=")
    assert all(s.owner_attempt == 1 for s in rendered)
    for text in (
        "Calls tool <strong>quote</strong>",
        "Tool <strong>quote</strong> returned",
        "&quot;price&quot;: 12.5",
        "admin-test-worker",
        "done: quote=",
        "agent analyst",
        "written by attempt 1",
    ):
        assert text in page, text
    assert "Result" in page and "completed" in page


@pytest.mark.django_db(transaction=True)
def test_tool_asking_the_model_to_retry_is_shown(clean_queues: None) -> None:
    viewer = make_user("viewer", "view_absurdtask")
    agents._retry_state["raised"] = 0
    task_id = absurd.spawn_sync("admin_retrier", {})["task_id"]
    run_worker()
    assert task_row(task_id)["state"] == "completed"
    response = client_for(viewer).get(task_url("agents", task_id))
    tools = [s for s in response.context["steps"] if s.kind == "tool"]
    assert [(s.tool_name, s.outcome_kind) for s in tools] == [("flaky", "model_retry"), ("flaky", "tool_return")]
    assert tools[0].message == "try again" and tools[0].is_failure
    assert "asked the model to retry</strong>" not in response.content.decode()
    assert "asked the model to retry: try again" in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_failed_task_shows_its_traceback_and_can_be_retried(clean_queues: None) -> None:
    operator = make_user("operator", "view_absurdtask", "retry_absurdtask")
    task_id = absurd.spawn_sync("admin_fails", {"n": 7}, max_attempts=1, retry_strategy={"kind": "none"})["task_id"]
    run_worker()
    assert task_row(task_id)["state"] == "failed"
    client = client_for(operator)
    page = client.get(task_url("agents", task_id)).content.decode()
    assert "ValueError</strong>: bad input: 7" in page
    assert "Traceback (most recent call last)" in page
    assert "raise ValueError(f&quot;bad input: {params[&#x27;n&#x27;]}&quot;)" in page
    client.post(task_url("agents", task_id, "retry"), {"mode": "in_place", "extra_attempts": 1})
    run_worker()
    detail = client.get(task_url("agents", task_id)).context["task"]
    assert [run.attempt for run in detail.runs] == [1, 2]
    assert detail.state == "failed" and detail.attempts == 2


@pytest.mark.django_db(transaction=True)
def test_emit_from_a_waiting_task_resumes_it(clean_queues: None) -> None:
    operator = make_user("operator", "view_absurdtask", "emit_absurdevent")
    task_id = absurd.spawn_sync("admin_waits", {})["task_id"]
    run_worker()
    assert task_row(task_id)["state"] == "sleeping"
    client = client_for(operator)
    response = client.get(task_url("agents", task_id))
    [item] = response.context["waits"]
    assert item["wait"].event_name == f"approval:{task_id}" and not item["wait"].emitted
    assert "not emitted yet" in response.content.decode()
    confirm = client.get(item["emit_url"])
    assert confirm.context["form"].initial["event_name"] == f"approval:{task_id}"
    response = client.post(
        task_url("agents", task_id, "emit_task"),
        {"queue": "agents", "event_name": f"approval:{task_id}", "payload": json.dumps({"by": "ops"})},
    )
    assert response.status_code == 302 and response["Location"] == task_url("agents", task_id)
    assert task_row(task_id)["state"] == "pending"
    [entry] = log_entries(task_id)
    assert "woke 1 waiting task(s)" in entry.get_change_message()
    run_worker()
    assert absurd.fetch_task_result_sync(task_id).result == {"approved": {"by": "ops"}}  # type: ignore[union-attr]
    page = client.get(task_url("agents", task_id)).content.decode()
    assert f"approval:{task_id}" in page  # the finished wait is a checkpoint now


# --- rendering of recorded outcomes no agent in this suite produces ---------------------------------


def checkpoint(name: str, state: Any) -> task_records.Checkpoint:
    return task_records.Checkpoint(
        name=name, state=state, status="committed", owner_run_id=None, updated_at=datetime.datetime.now(datetime.UTC)
    )


def test_render_steps_decodes_every_recorded_tool_outcome() -> None:
    response = {
        "kind": "response",
        "model_name": "gpt-test",
        "usage": {"input_tokens": 10, "output_tokens": 3},
        "parts": [
            {"part_kind": "thinking", "content": "hmm"},
            {"part_kind": "tool-call", "tool_name": "lookup", "args": '{"q": "a"}', "tool_call_id": "1"},
            {"part_kind": "tool-call", "tool_name": "lookup", "args": {"q": "b"}, "tool_call_id": "2"},
            {"part_kind": "tool-call", "tool_name": "approve", "args": {}, "tool_call_id": "3"},
            {"part_kind": "file", "content": {}},
        ],
    }
    rendered = steps.decode_steps(
        [
            checkpoint("bot__model.request", response),
            checkpoint(
                "bot__function_toolset__<agent>.call_tool:lookup", {"kind": "call_deferred", "metadata": {"x": 1}}
            ),
            checkpoint(
                "bot__function_toolset__<agent>.call_tool:lookup#2",
                {"kind": "validation_error", "title": "lookup", "errors": [{"msg": "bad"}]},
            ),
            checkpoint(
                "bot__function_toolset__<agent>.call_tool:approve", {"kind": "approval_required", "metadata": None}
            ),
            checkpoint("bot__mcp_server__srv.call_tool", {"kind": "tool_failed", "message": "boom"}),
            checkpoint("bot__model.request_stream.fast#2", {"parts": [{"part_kind": "text", "content": "hi"}]}),
            checkpoint("bot__external_event.approval.token", "absurd-event:agents:external:1:abc"),
            checkpoint("my_own_step", [1, 2]),
        ]
    )
    model, deferred, invalid, approval, mcp, streamed, token, own = rendered
    assert model.thinking == ["hmm"] and model.other_parts == ["file"]
    assert [c.args for c in model.tool_calls] == [{"q": "a"}, {"q": "b"}, {}]
    assert (model.model_name, model.input_tokens, model.output_tokens) == ("gpt-test", 10, 3)
    assert deferred.call is not None and deferred.call.args == {"q": "a"} and deferred.outcome == "was deferred"
    assert invalid.call is not None and invalid.call.args == {"q": "b"} and invalid.is_failure
    assert approval.outcome == "needs approval" and approval.call is not None and approval.call.tool_call_id == "3"
    assert mcp.tool_name == "tool" and mcp.message == "boom"
    assert streamed.title == "Model request 2 (streamed)" and streamed.texts == ["hi"]
    assert token.kind == "event" and token.title == "Wait approval: resume token made"
    assert own.kind == "step" and own.title == "my_own_step" and "1," in pretty_json(own.state)


def test_pretty_json_cuts_huge_values_and_durations_read_well() -> None:
    text = pretty_json({"blob": "x" * 500}, limit=100)
    assert text.endswith("more characters not shown)") and len(text) < 200
    assert format_duration(datetime.timedelta(milliseconds=85)) == "85 ms"
    assert format_duration(datetime.timedelta(seconds=4.25)) == "4.2 s"
    assert format_duration(datetime.timedelta(seconds=185)) == "3 min 5 s"
    assert format_duration(datetime.timedelta(hours=2, minutes=10)) == "2 h 10 min"
    assert format_duration(datetime.timedelta(days=3, hours=4)) == "3 d 4 h"
    assert format_duration(None) == ""


# --- bulk actions ---------------------------------------------------------------------------------


def failed_tasks(count: int) -> list[str]:
    task_ids = []
    for n in range(count):
        task_id = absurd.spawn_sync("analyse", {"prompt": f"bulk {n}"}, max_attempts=1)["task_id"]
        fail_by_claim_timeout(task_id)
        task_ids.append(task_id)
    return task_ids


def bulk(client: Client, action: str, task_ids: list[str], **extra: Any) -> Any:
    data = {"bulk_action": action, "task": [f"{task_id}:agents" for task_id in task_ids], **extra}
    return client.post(url("bulk"), data)


@pytest.mark.django_db
def test_bulk_actions_need_their_own_permission_before_any_query(viewer: User, failed_task: str) -> None:
    assert b'name="bulk_action"' not in client_for(viewer).get(url("changelist")).content  # nothing to select
    retrier = make_user("retrier", "view_absurdtask", "retry_absurdtask")
    for user, action in [(viewer, "retry"), (viewer, "cancel"), (retrier, "cancel"), (make_user("x"), "retry")]:
        with CaptureQueriesContext(connection) as queries:
            response = bulk(client_for(user), action, [failed_task], confirm="yes", mode="in_place", extra_attempts=1)
        assert response.status_code == 403
        assert not any("absurd." in query["sql"] for query in queries.captured_queries)
    assert task_row(failed_task)["state"] == "failed"
    text = client_for(retrier).get(url("changelist")).content.decode()
    assert 'value="retry"' in text and 'value="cancel"' not in text
    assert f'value="{failed_task}:agents"' in text


@pytest.mark.django_db
def test_bulk_retry_confirms_once_then_retries_each_with_a_log_entry(operator: User) -> None:
    failed = failed_tasks(2)
    pending = absurd.spawn_sync("analyse", {"prompt": "still waiting"})["task_id"]
    client = client_for(operator)
    assert client.get(url("bulk")).status_code == 302  # a GET changes nothing

    page = bulk(client, "retry", [*failed, pending, str(uuid.uuid4())])
    assert page.status_code == 200
    text = page.content.decode()
    assert "2 tasks to retry" in text and "Left alone" in text and pending in text and "is gone" in text
    assert [task_row(task_id)["state"] for task_id in failed] == ["failed", "failed"]

    done = bulk(client, "retry", failed, confirm="yes", mode="in_place", extra_attempts=2)
    assert done.status_code == 302 and done["Location"] == url("changelist")
    for task_id in failed:
        assert task_row(task_id) | {"task_name": None} == {
            "state": "pending",
            "attempts": 2,
            "max_attempts": 3,
            "task_name": None,
        }
        [entry] = log_entries(task_id)
        assert entry.action_flag == CHANGE and "Retried in place: attempt 2 of 3 (bulk action)." in entry.change_message
    assert task_row(pending)["state"] == "pending" and log_entries(pending) == []


@pytest.mark.django_db
def test_bulk_retry_as_new_tasks_logs_both_sides(operator: User) -> None:
    [failed] = failed_tasks(1)
    bulk(client_for(operator), "retry", [failed], confirm="yes", mode="new", extra_attempts=3)
    [entry] = log_entries(failed)
    new_id = entry.change_message.split()[4]
    assert task_row(new_id)["state"] == "pending" and task_row(new_id)["max_attempts"] == 3
    assert [e.action_flag for e in log_entries(new_id)] == [ADDITION]


@pytest.mark.django_db
def test_bulk_cancel_cancels_each_unfinished_task(operator: User) -> None:
    [failed] = failed_tasks(1)
    pending = [absurd.spawn_sync("analyse", {"prompt": f"p{n}"})["task_id"] for n in range(3)]
    client = client_for(operator)
    assert "3 tasks to cancel" in bulk(client, "cancel", [*pending, failed]).content.decode()
    bulk(client, "cancel", [*pending, failed], confirm="yes")
    assert [task_row(task_id)["state"] for task_id in pending] == ["cancelled"] * 3
    assert task_row(failed)["state"] == "failed"
    assert all(len(log_entries(task_id)) == 1 for task_id in pending) and log_entries(failed) == []


@pytest.mark.django_db
def test_bulk_actions_are_csrf_protected(operator: User, pending_task: str) -> None:
    client = client_for(operator, enforce_csrf_checks=True)
    assert bulk(client, "cancel", [pending_task], confirm="yes").status_code == 403
    assert task_row(pending_task)["state"] == "pending"


# --- wording --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_sleeping_task_waiting_for_a_retry_says_so(viewer: User) -> None:
    task_id = absurd.spawn_sync("analyse", {"prompt": "again"}, max_attempts=3)["task_id"]
    with connection.cursor() as cursor:
        cursor.execute("select task_id from absurd.claim_task('agents', 'doomed-worker', 1, 1)")
        cursor.execute("select set_config('absurd.fake_now', (clock_timestamp() + interval '1 minute')::text, false)")
        try:
            cursor.execute("select count(*) from absurd.claim_task('agents', 'sweeper', 1, 1)")
        finally:
            cursor.execute("select set_config('absurd.fake_now', '', false)")
    assert task_row(task_id)["state"] == "sleeping"
    text = client_for(viewer).get(task_url("agents", task_id)).content.decode()
    assert "waiting to retry: attempt 1 failed, attempt 2 starts at " in text


@pytest.mark.django_db
def test_emit_is_not_offered_on_a_finished_task(operator: User, failed_task: str, pending_task: str) -> None:
    client = client_for(operator)
    assert "Emit an event…" not in client.get(task_url("agents", failed_task)).content.decode()
    assert "Emit an event…" in client.get(task_url("agents", pending_task)).content.decode()
