"""``POST /agents/hooks/<name>``: signed webhooks that emit the Absurd event a waiting task awaits."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test import Client, override_settings

from django_absurd_agents import absurd
from django_absurd_agents.testing import run_tasks

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls("tests.urls_hooks")]

SECRET = "s3cret-s3cret-s3cret"
OLD_SECRET = "the-previous-secret-1"
HOOKS = {
    "github": {"SECRET": [SECRET, OLD_SECRET], "SCHEME": "github", "EVENT": "review:{pull_request.number}"},
    "stripe": {"SECRET": SECRET, "SCHEME": "stripe", "EVENT": "payment:{data.object.metadata.order}", "MAX_AGE": 60},
    "own": {"SECRET": SECRET, "EVENT": "reply:{thread}", "QUEUE": "other"},
    "computed": {"SECRET": SECRET, "SCHEME": "github", "EVENT": lambda request, payload: f"ping:{len(payload)}"},
}
SETTINGS = {"QUEUES": ["agents", "other"], "WEBHOOKS": HOOKS}


@absurd.register_task(name="wait_for_event")
async def wait_for_event(params: dict[str, Any], ctx: Any) -> Any:
    return await ctx.await_event(params["event"])


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(hook: str, body: bytes, **headers: str) -> Any:
    return Client().post(f"/agents/hooks/{hook}", body, content_type="application/json", headers=headers)


def events(queue: str = "agents") -> list[tuple[str, Any]]:
    with connection.cursor() as cursor:
        cursor.execute(f"select event_name, payload from absurd.e_{queue} where payload is not null order by 1")
        return [(name, json.loads(payload) if isinstance(payload, str) else payload) for name, payload in cursor]


def waiting(event: str, queue: str = "agents") -> str:
    """A task suspended on ``event``; returns its id."""
    spawned = absurd.spawn_sync("wait_for_event", {"event": event}, queue=queue)
    assert [r.outcome for r in run_tasks([queue])] == ["suspended"]
    return spawned["task_id"]


@override_settings(ABSURD_AGENTS=SETTINGS)
def test_a_github_delivery_wakes_the_waiting_task() -> None:
    task_id = waiting("review:42")
    body = json.dumps({"action": "submitted", "pull_request": {"number": 42}}).encode()
    response = post("github", body, X_Hub_Signature_256="sha256=" + sign(body), X_GitHub_Event="pull_request_review")
    assert response.status_code == 202 and response.json() == {"event": "review:42"}
    assert [(r.outcome, r.result) for r in run_tasks()] == [
        ("completed", {"action": "submitted", "pull_request": {"number": 42}})
    ]
    snapshot = absurd.fetch_task_result_sync(task_id)
    assert snapshot is not None and snapshot.state == "completed"


@override_settings(ABSURD_AGENTS=SETTINGS)
def test_a_rotated_secret_still_verifies() -> None:
    body = b'{"pull_request": {"number": 7}}'
    assert post("github", body, X_Hub_Signature_256="sha256=" + sign(body, OLD_SECRET)).status_code == 202
    assert events() == [("review:7", {"pull_request": {"number": 7}})]


@override_settings(ABSURD_AGENTS=SETTINGS)
def test_a_stripe_delivery_is_verified_with_its_timestamp() -> None:
    task_id = waiting("payment:A-17")
    body = json.dumps(
        {"type": "payment_intent.succeeded", "data": {"object": {"metadata": {"order": "A-17"}}}}
    ).encode()
    now = str(int(time.time()))
    header = f"t={now},v1={sign(now.encode() + b'.' + body)},v0=ignored"
    assert post("stripe", body, Stripe_Signature=header).status_code == 202
    run_tasks()
    snapshot = absurd.fetch_task_result_sync(task_id)
    assert snapshot is not None and snapshot.result["type"] == "payment_intent.succeeded"


@override_settings(ABSURD_AGENTS=SETTINGS)
@pytest.mark.parametrize("age", [-120, 120])
def test_a_stale_or_future_timestamp_is_refused_as_a_replay(age: int) -> None:
    body = b'{"data": {"object": {"metadata": {"order": "A-1"}}}}'
    then = str(int(time.time()) - age)
    response = post("stripe", body, Stripe_Signature=f"t={then},v1={sign(then.encode() + b'.' + body)}")
    assert response.status_code == 403 and "replay" in response.json()["error"]
    assert events() == []


@override_settings(ABSURD_AGENTS=SETTINGS)
def test_the_own_scheme_signs_timestamp_and_body_and_emits_on_its_queue() -> None:
    body = b'{"thread": "t-9", "text": "yes, go ahead"}'
    now = str(int(time.time()))
    signed = sign(now.encode() + b"." + body)
    assert post("own", body, X_Signature_256=signed, X_Signature_Timestamp=now).status_code == 202
    assert events("other") == [("reply:t-9", {"thread": "t-9", "text": "yes, go ahead"})]
    # The signature covers the timestamp: the same signature with another time is refused.
    later = str(int(now) + 1)
    assert post("own", body, X_Signature_256=signed, X_Signature_Timestamp=later).status_code == 403
    assert post("own", body, X_Signature_256=signed).status_code == 401


@override_settings(ABSURD_AGENTS=SETTINGS)
def test_unsigned_or_badly_signed_requests_write_nothing() -> None:
    task_id = waiting("review:1")
    body = b'{"pull_request": {"number": 1}}'
    assert post("github", body).status_code == 401
    assert post("github", body, X_Hub_Signature_256="sha256=" + sign(body, "not-the-secret-at-all")).status_code == 403
    assert post("github", body, X_Hub_Signature_256="sha256=" + sign(body + b" ")).status_code == 403
    assert post("stripe", body, Stripe_Signature="v1=" + sign(body)).status_code == 401
    assert events() == []
    assert run_tasks() == []
    snapshot = absurd.fetch_task_result_sync(task_id)
    assert snapshot is not None and snapshot.state == "sleeping"


@override_settings(ABSURD_AGENTS=SETTINGS)
def test_requests_that_name_no_hook_or_no_event_are_refused() -> None:
    body = b'{"pull_request": {}}'
    signature = "sha256=" + sign(body)
    assert post("nowhere", body, X_Hub_Signature_256=signature).status_code == 404
    assert Client().get("/agents/hooks/github").status_code == 405
    missing = post("github", body, X_Hub_Signature_256=signature)
    assert missing.status_code == 400 and "pull_request.number" in missing.json()["error"]
    not_json = b"<xml/>"
    assert post("github", not_json, X_Hub_Signature_256="sha256=" + sign(not_json)).status_code == 400
    assert events() == []


@override_settings(ABSURD_AGENTS=SETTINGS)
def test_an_event_name_may_come_from_a_callable() -> None:
    body = b'{"a": 1, "b": 2}'
    response = post("computed", body, X_Hub_Signature_256="sha256=" + sign(body))
    assert response.json() == {"event": "ping:2"}


@override_settings(ABSURD_AGENTS=SETTINGS)
def test_the_webhook_url_is_named() -> None:
    from django.urls import reverse

    assert reverse("absurd_agents:webhook", args=["github"]) == "/agents/hooks/github"


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"SECRET": "short", "EVENT": "x"}, "at least 16 characters"),
        ({"SECRET": SECRET, "EVENT": "x", "SCHEME": "md5"}, "use one of github, stripe, hmac-sha256"),
        ({"SECRET": SECRET}, "EVENT"),
        ({"SECRET": SECRET, "EVENT": "x", "SIGNATURE": "X-Sig"}, "unknown key(s) SIGNATURE"),
        ({"SECRET": SECRET, "EVENT": "x", "QUEUE": "No-Such"}, "QUEUE"),
    ],
)
def test_malformed_hooks_fail_the_system_check(config: dict[str, Any], problem: str) -> None:
    with override_settings(ABSURD_AGENTS={"WEBHOOKS": {"bad": config}}), pytest.raises(SystemCheckError) as raised:
        call_command("check")
    assert "absurd_agents.E030" in str(raised.value) and problem in str(raised.value)
