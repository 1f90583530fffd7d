"""The forms of the task admin's actions: retry, cancel, emit."""

from __future__ import annotations

from typing import Any

from django import forms

from django_absurd_agents.exceptions import UnstorableJSON
from django_absurd_agents.json_text import loads_storable_json


class RetryForm(forms.Form):
    mode = forms.ChoiceField(
        choices=[
            ("in_place", "Retry this task in place, with more attempts"),
            ("new", "Spawn a new task with the same params"),
        ],
        initial="in_place",
        widget=forms.RadioSelect,
    )
    extra_attempts = forms.IntegerField(
        min_value=1,
        max_value=1000,
        initial=1,
        help_text="In place: how many attempts to add. New task: its max attempts.",
    )


class BulkRetryForm(RetryForm):
    """The retry of several tasks at once: the same choice, applied to each."""

    mode = forms.ChoiceField(
        choices=[
            ("in_place", "Retry each task in place, with more attempts"),
            ("new", "Spawn a new task for each, with the same params"),
        ],
        initial="in_place",
        widget=forms.RadioSelect,
    )


class CancelForm(forms.Form):
    """Nothing to fill in: the POST itself (with its CSRF token) is the confirmation."""


class EmitForm(forms.Form):
    queue = forms.ChoiceField()
    event_name = forms.CharField(max_length=1000, widget=forms.TextInput(attrs={"size": 80}))
    payload = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6, "cols": 80, "spellcheck": "false"}),
        initial="{}",
        help_text="JSON. The first emit of an event name wins; later emits of the same name are ignored.",
    )

    def __init__(self, *args: Any, queues: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["queue"].choices = [(q, q) for q in queues]  # type: ignore[attr-defined]

    def clean_event_name(self) -> str:
        name = str(self.cleaned_data["event_name"]).strip()
        if not name:
            raise forms.ValidationError("Give the event a name.")
        return name

    def clean_payload(self) -> Any:
        text = self.cleaned_data["payload"]
        try:
            return loads_storable_json(text)
        except UnstorableJSON as exc:
            raise forms.ValidationError(f"This JSON cannot be stored: {exc}") from exc
        except ValueError as exc:
            raise forms.ValidationError(f"This is not JSON: {exc}.") from exc
