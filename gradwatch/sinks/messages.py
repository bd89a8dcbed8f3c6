"""What a webhook posts: the Slack text and the JSON bodies of incident events and run summaries.

Slack gets one message per logging step (the step's events grouped, so twelve blocks collapsing at once are
one message, not twelve) in Slack's ``mrkdwn``. A JSON endpoint gets one object per event carrying the
incident id and state, so a receiver can update an incident rather than append a line (as PagerDuty and
Opsgenie do with a dedup key).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..alerts.incident import IncidentEvent, RunSummary

__all__ = ["slack_text", "slack_summary", "json_body", "json_summary", "held_note"]

_ICONS = {
    "opened": {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"},
    "escalated": {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"},
    "reminder": {"info": ":hourglass:", "warning": ":hourglass:", "critical": ":rotating_light:"},
    "resolved": {"info": ":white_check_mark:", "warning": ":white_check_mark:", "critical": ":white_check_mark:"},
}


def held_note(held: int) -> str:
    """The line that says how many messages the rate limit held back."""
    if not held:
        return ""
    return (f"_{held} earlier message{'s' * (held != 1)} held back by the rate limit "
            "(alerts.jsonl has every event)_")


def _slack_event(e: Any, title: str) -> str:
    kind = getattr(e, "kind", None)
    if kind is None:  # a plain Alert, sent directly
        where = f" in `{e.name}`" if e.name else ""
        return (f"{_ICONS['opened'].get(e.severity, '')} *{title} {e.severity}*: `{e.rule}` at step "
                f"{e.step}{where}\n{e.message}\n_hint:_ {e.hint}")
    where = f" in `{e.name}`" if e.name else ""
    icon = _ICONS[kind].get(e.severity, "")
    head = f"{icon} *{title} {e.severity}* — `{e.rule}`{where} {e.what} at step {e.step}" if kind != "resolved" \
        else f"{icon} *{title} resolved* — `{e.rule}`{where} ({e.severity}) at step {e.step}"
    if kind == "opened":
        recording = getattr(e.incident, "recording", None)
        return f"{head}\n{e.message}\n_hint:_ {e.hint}" + (f"\n_lead-up:_ `{recording}`" if recording else "")
    if kind == "escalated":
        return f"{head}\n{e.message}"
    return f"{head}, {e.progress()}"


def slack_text(events: Sequence[Any], title: str, held: int = 0) -> bytes:
    """One Slack message for a step's events (plus the held-back note)."""
    lines = [_slack_event(e, title) for e in events]
    note = held_note(held)
    if note:
        lines.append(note)
    return json.dumps({"text": "\n\n".join(lines)}).encode("utf-8")


def slack_summary(summary: RunSummary, title: str, held: int = 0) -> bytes:
    """The end-of-run summary as one Slack message (plus the held-back note)."""
    lines = summary.lines()
    text = f":clipboard: *{title}* — {lines[0].removeprefix('gradwatch ')}"
    if len(lines) > 1:
        text += "\n" + "\n".join(f"• {line.strip()}" for line in lines[1:])
    note = held_note(held)
    return json.dumps({"text": text + (f"\n{note}" if note else "")}).encode("utf-8")


def json_body(event: Any, title: str, held: int = 0) -> bytes:
    """One event (or a plain Alert) as a JSON object with ``source`` and ``held_back``."""
    d = event.to_dict()
    if not isinstance(event, IncidentEvent):
        d["event"] = "alert"
    return json.dumps({"source": title, **d, "held_back": held}).encode("utf-8")


def json_summary(summary: RunSummary, title: str, held: int = 0) -> bytes:
    """The end-of-run summary as a JSON object with ``source`` and ``held_back``."""
    return json.dumps({"source": title, **summary.to_dict(), "held_back": held}).encode("utf-8")
