"""Webhooks that wake tasks: ``POST /agents/hooks/<hook name>`` emits the Absurd event a task awaits.

Each hook is declared in ``ABSURD_AGENTS["WEBHOOKS"]``::

    ABSURD_AGENTS = {
        "WEBHOOKS": {
            "github": {
                "SECRET": os.environ["GITHUB_WEBHOOK_SECRET"],  # or a list, to rotate
                "SCHEME": "github",  # X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>
                "EVENT": "review:{pull_request.number}",  # fields of the JSON body
            },
            "stripe": {"SECRET": "whsec_...", "SCHEME": "stripe", "EVENT": "payment:{data.object.metadata.order}"},
        }
    }

The view reads the raw body, checks the signature with a constant-time comparison (and, for schemes
that sign a timestamp, that it is within ``MAX_AGE`` seconds of now), and only then parses the JSON,
builds the event name and emits the event, on Django's connection (so ``ATOMIC_REQUESTS`` holds).
A missing or unreadable signature is answered 401, a wrong or stale one 403: nothing is written.

Schemes:

* ``"github"``: header ``X-Hub-Signature-256``, ``sha256=`` + hex HMAC-SHA256 of the body. GitHub signs
  no timestamp, so there is no replay window; a replayed delivery emits an event that was already
  emitted, and Absurd keeps the first emit (make event names unique per occurrence).
* ``"stripe"``: header ``Stripe-Signature``, ``t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``.
* ``"hmac-sha256"``: for your own senders: header ``X-Signature-256`` (hex, ``sha256=`` optional) of
  ``"<timestamp>.<body>"``, the Unix time in ``X-Signature-Timestamp``.

``SIGNATURE_HEADER`` / ``TIMESTAMP_HEADER`` rename the headers, ``QUEUE`` picks the queue (default:
the default queue). ``EVENT`` may also be a callable taking ``(request, payload)`` and returning the name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from django_absurd_agents import conf
from django_absurd_agents.client import absurd
from django_absurd_agents.exceptions import AbsurdAgentsError, InvalidParams

SCHEMES = {
    # scheme: (signature header, timestamp header); Stripe's timestamp is inside its signature header
    "github": ("X-Hub-Signature-256", None),
    "stripe": ("Stripe-Signature", None),
    "hmac-sha256": ("X-Signature-256", "X-Signature-Timestamp"),
}
KEYS = frozenset({"SECRET", "SCHEME", "EVENT", "QUEUE", "MAX_AGE", "SIGNATURE_HEADER", "TIMESTAMP_HEADER"})
DEFAULT_MAX_AGE = 300
_FIELD = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True)
class Hook:
    name: str
    secrets: tuple[bytes, ...]
    scheme: str
    event: str | Callable[[HttpRequest, Any], str]
    queue: str | None
    max_age: int
    signature_header: str
    timestamp_header: str | None


def hooks() -> dict[str, Any]:
    value = conf.user_settings().get("WEBHOOKS", conf.DEFAULTS.get("WEBHOOKS")) or {}
    if not isinstance(value, dict):
        raise ImproperlyConfigured("ABSURD_AGENTS['WEBHOOKS'] must be a dict of hook name -> settings.")
    return value


def hook(name: str) -> Hook | None:
    """The hook declared as ``name``, None when there is none; ``ImproperlyConfigured`` when it is malformed."""
    config = hooks().get(name)
    if config is None:
        return None
    where = f"ABSURD_AGENTS['WEBHOOKS'][{name!r}]"
    if not isinstance(config, dict):
        raise ImproperlyConfigured(f"{where} must be a dict.")
    unknown = sorted(set(config) - KEYS)
    if unknown:
        raise ImproperlyConfigured(
            f"{where} has unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(KEYS))}."
        )
    secret = config.get("SECRET")
    secrets = tuple(secret) if isinstance(secret, list | tuple) else (secret,)
    if not secrets or not all(isinstance(s, str | bytes) and len(s) >= 16 for s in secrets):
        raise ImproperlyConfigured(
            f"{where}['SECRET'] must be a string of at least 16 characters (or a list of them, to rotate): "
            "the shared secret the sender signs with."
        )
    scheme = config.get("SCHEME", "hmac-sha256")
    if scheme not in SCHEMES:
        raise ImproperlyConfigured(f"{where}['SCHEME'] is {scheme!r}; use one of {', '.join(SCHEMES)}.")
    event = config.get("EVENT")
    if not (isinstance(event, str) and event) and not callable(event):
        raise ImproperlyConfigured(
            f"{where}['EVENT'] must be the event name, with {{field.path}} placeholders filled from the JSON body "
            "(e.g. 'review:{pull_request.number}'), or a callable taking (request, payload)."
        )
    max_age = config.get("MAX_AGE", DEFAULT_MAX_AGE)
    if not isinstance(max_age, int) or max_age < 1:
        raise ImproperlyConfigured(f"{where}['MAX_AGE'] must be a positive number of seconds.")
    queue = config.get("QUEUE")
    if queue is not None and conf.queue_name_error(queue):
        raise ImproperlyConfigured(f"{where}['QUEUE']: {conf.queue_name_error(queue)}")
    signature_header, timestamp_header = SCHEMES[scheme]
    return Hook(
        name=name,
        secrets=tuple(s.encode() if isinstance(s, str) else s for s in secrets),
        scheme=scheme,
        event=event,
        queue=queue,
        max_age=max_age,
        signature_header=config.get("SIGNATURE_HEADER", signature_header),
        timestamp_header=config.get("TIMESTAMP_HEADER", timestamp_header),
    )


class Refused(AbsurdAgentsError, Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _digest(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _matches(config: Hook, message: bytes, signatures: list[str]) -> bool:
    found = False
    for secret in config.secrets:  # every comparison runs: the time taken tells nothing
        expected = _digest(secret, message)
        for signature in signatures:
            found |= hmac.compare_digest(expected, signature.strip().lower())
    return found


def _fresh(config: Hook, timestamp: str) -> None:
    try:
        sent = int(timestamp)
    except ValueError:
        raise Refused(401, "The signature's timestamp is not a Unix time.") from None
    if abs(time.time() - sent) > config.max_age:
        raise Refused(403, f"The signature is older than {config.max_age}s (or from the future): refused as a replay.")


def verify(config: Hook, request: HttpRequest, body: bytes) -> None:
    """Raise ``Refused`` unless ``body`` carries a valid, fresh signature of the hook's scheme."""
    header = request.headers.get(config.signature_header)
    if not header:
        raise Refused(401, f"Missing signature header {config.signature_header}.")
    if config.scheme == "stripe":
        parts = [part.split("=", 1) for part in header.split(",") if "=" in part]
        timestamps = [value for key, value in parts if key.strip() == "t"]
        signatures = [value for key, value in parts if key.strip() == "v1"]
        if len(timestamps) != 1 or not signatures:
            raise Refused(401, f"The {config.signature_header} header has no t=... and v1=... parts.")
        if not _matches(config, timestamps[0].strip().encode() + b"." + body, signatures):
            raise Refused(403, "Invalid signature.")
        _fresh(config, timestamps[0].strip())
        return
    signature = header.removeprefix("sha256=")
    if config.scheme == "github":
        if not _matches(config, body, [signature]):
            raise Refused(403, "Invalid signature.")
        return
    timestamp = request.headers.get(config.timestamp_header or "")
    if not timestamp:
        raise Refused(401, f"Missing timestamp header {config.timestamp_header}.")
    if not _matches(config, timestamp.strip().encode() + b"." + body, [signature]):
        raise Refused(403, "Invalid signature.")
    _fresh(config, timestamp.strip())


def event_name(config: Hook, request: HttpRequest, payload: Any) -> str:
    if callable(config.event):
        name = config.event(request, payload)
    else:

        def field(match: re.Match[str]) -> str:
            value: Any = payload
            for key in match.group(1).strip().split("."):
                if isinstance(value, dict) and key in value:
                    value = value[key]
                elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                    value = value[int(key)]
                else:
                    raise Refused(400, f"The JSON body has no field {match.group(1)!r} for the event name.")
            if isinstance(value, dict | list) or value is None:
                raise Refused(400, f"The field {match.group(1)!r} is not a plain value.")
            return str(value).lower() if isinstance(value, bool) else str(value)

        name = _FIELD.sub(field, config.event)
    if not isinstance(name, str) or not name:
        raise Refused(400, "No event name could be made from the request.")
    return name


@csrf_exempt
@require_POST
def receive(request: HttpRequest, name: str) -> HttpResponse:
    """Verify a webhook delivery and emit its event; 401/403 before anything is written when it is not signed."""
    config = hook(name)
    if config is None:
        return JsonResponse({"error": f"No webhook named {name!r}."}, status=404)
    body = request.body
    try:
        verify(config, request, body)
        try:
            payload = json.loads(body)
        except ValueError:
            raise Refused(400, "The body is not JSON.") from None
        event = event_name(config, request, payload)
        absurd.emit_event_sync(event, payload, queue_name=config.queue)
    except Refused as refused:
        return JsonResponse({"error": str(refused)}, status=refused.status)
    except InvalidParams as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"event": event}, status=202)
